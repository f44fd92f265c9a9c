//! `sigil tpm`: what an administrator reads off a device's TPM before it first attests.
use sigil_tpm::{DEFAULT_TCTI, TpmDevice, ek_public_endorsement};

#[derive(Debug, clap::Subcommand)]
pub enum TpmCmd {
    /// Print the SHA-256 of this TPM's EK public key: the node's SPIFFE ID is
    /// spiffe://<td>/sigil/node/tpm/<it>, and a server pins a TPM without an EK certificate
    /// with `--tpm-ek-hash <it>` (tpm_ek_hashes).
    EkHash {
        /// The TPM (TCTI), e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321.
        #[arg(long, default_value = DEFAULT_TCTI)]
        tpm_tcti: String,
    },
}

pub async fn run(cmd: TpmCmd) -> anyhow::Result<()> {
    match cmd {
        TpmCmd::EkHash { tpm_tcti } => {
            let hash = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
                let mut device = TpmDevice::open(&tpm_tcti)?;
                let ek = ek_public_endorsement(&device.ek_public()?)?;
                Ok(ek.ek_hash)
            })
            .await??;
            println!("{hash}");
            Ok(())
        }
    }
}

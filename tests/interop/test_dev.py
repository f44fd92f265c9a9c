"""`sigil dev` prints commands that work as printed: run them, verbatim, in a shell."""
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path



def commands(text: str) -> str:
    """The shell commands of the printed instructions: indented lines and heredoc bodies."""
    out, heredoc = [], False
    for line in text.splitlines():
        if heredoc:
            out.append(line)
            heredoc = line != "EOF"
        elif line.startswith("  ") and not line.startswith("  trust authority") \
                and not line.startswith(("  admin socket", "  node agent", "  Workload API", "  data ")):
            out.append(line)
            heredoc = line.rstrip().endswith("<<'EOF'")
    return "\n".join(out)


def test_sigil_dev_instructions_work_as_printed(tmp_path: Path):
    sigil = os.environ["SIGIL_BIN"]
    data = tmp_path / "dev"
    log = open(tmp_path / "dev.log", "wb")
    proc = subprocess.Popen(
        # Port 0 for every listener: sigil dev prints the ports it bound. (Ports picked here
        # and bound later could be taken meanwhile, e.g. by sigil dev's own connections.)
        [sigil, "dev", "--data-dir", str(data), "--listen-addr", "127.0.0.1:0",
         "--proxy-listen", "127.0.0.1:0", "--outbound-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        printed = []
        deadline = time.time() + 60
        while not any(line.endswith(" entry list\n") for line in printed):
            assert time.time() < deadline, "sigil dev did not print its instructions"
            line = proc.stdout.readline()
            assert line or proc.poll() is None, (tmp_path / "dev.log").read_text()
            printed.append(line)
        script = commands("".join(printed))
        assert "fetch-x509" in script and "chat/completions" in script and "openai" in script
        # The binary is named by the path it runs from (after `cargo run -- dev` there is no
        # `sigil` on PATH), so the commands work with none on PATH here either.
        fetch = next(line for line in script.splitlines() if "workload fetch-x509" in line)
        assert shlex.split(fetch)[0] == os.path.realpath(sigil), fetch
        assert not re.search(r"^\s*sigil\s", script, re.M), script
        # `python3` (with openai installed) as a user would have it on PATH.
        env = dict(os.environ)
        path = [d for d in env["PATH"].split(":") if not (Path(d) / "sigil").exists()]
        env["PATH"] = ":".join([str(Path(sys.executable).parent), *path])
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        out = done.stdout
        assert ": OK" in out, out  # openssl verify
        assert '"object":"chat.completion"' in out, out  # curl through the proxy
        assert "['defect-detector']" in out, out  # models.list(), filtered by policy
        assert out.count("spiffe://sigil.test/demo/agent") >= 2, out
        audit = (data / "proxy-audit.log").read_text()
        assert '"decision":"allow"' in audit
        # The openai snippet with only base_url went out through the caller-side sidecar,
        # which decided egress and recorded it.
        assert "base_url=\"http://127.0.0.1:" in script, script
        outbound = (data / "outbound-audit.log").read_text()
        assert '"direction":"outbound","route":"demo-model"' in outbound, outbound
        assert '"decision":"allow"' in outbound, outbound
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()

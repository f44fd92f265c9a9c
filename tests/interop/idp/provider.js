// A real OpenID provider for the interop tests: `oidc-provider` (a certified implementation)
// with its development login and consent pages, which the tests fill in like a browser would.
// Any login name is a user; the groups of a few are fixed below. Access tokens are JWTs
// (RFC 9068) for resource indicators (RFC 8707):
//   urn:sigil        audience "urn:sigil", 300 s
//   urn:sigil:short  audience "urn:sigil", 1 s (for the expiry test)
//   anything else    audience = the resource, 300 s
//
// usage: node provider.js <port>   (prints "ready <issuer>" once listening)
import { generateKeyPairSync } from 'node:crypto';
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const issuer = `http://127.0.0.1:${port}`;

const GROUPS = {
  alice: ['clinicians'],
  bob: ['visitors'],
};

function key(kind, options, alg) {
  const { privateKey } = generateKeyPairSync(kind, options);
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, alg, use: 'sig', kid: `${alg.toLowerCase()}-${port}` };
}

const SCOPES = ['tool:call', 'tool:list', 'model:invoke', 'model:list'];

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'console',
      client_secret: 'console-secret',
      redirect_uris: ['http://127.0.0.1/callback'],
      grant_types: ['authorization_code'],
      response_types: ['code'],
    },
  ],
  jwks: {
    keys: [key('ec', { namedCurve: 'P-256' }, 'ES256'), key('rsa', { modulusLength: 2048 }, 'RS256')],
  },
  findAccount: async (_ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, groups: GROUPS[id] ?? [] }),
  }),
  claims: { openid: ['sub'], groups: ['groups'] },
  scopes: ['openid', 'offline_access', ...SCOPES],
  extraTokenClaims: async (_ctx, token) =>
    token.accountId ? { groups: GROUPS[token.accountId] ?? [] } : undefined,
  pkce: { required: () => false },
  features: {
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'urn:sigil',
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resource) => ({
        scope: SCOPES.join(' '),
        audience: resource.startsWith('urn:sigil') ? 'urn:sigil' : resource,
        accessTokenTTL: resource === 'urn:sigil:short' ? 1 : 300,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: resource === 'urn:sigil:rsa' ? 'RS256' : 'ES256' } },
      }),
    },
  },
});
provider.proxy = false;

provider.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});

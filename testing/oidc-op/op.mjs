// A real OpenID Provider (panva's oidc-provider, OpenID certified) for jitgate's
// sign-in tests. Started by the tests, never in production.
//
//   node op.mjs CONFIG.json
//
// CONFIG: {"clients": [oidc-provider client metadata], "users": "USERS.json"}.
// USERS.json maps a login to its claims, read again at every sign-in (a test moves a
// user between groups by rewriting it): {"alice": {"name": "Alice", "email": "...",
// "groups": ["ops"]}}. Listens on a free loopback port and prints one JSON line,
// {"issuer": "http://127.0.0.1:PORT"}. The login form is the provider's development
// form (any password); consent is given at once. POST /test/rotate replaces the
// signing key (a new key id), as a provider rotating its keys does.

import { readFileSync } from 'node:fs';
import http from 'node:http';
import { generateKeyPair, exportJWK } from 'jose';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = () => JSON.parse(readFileSync(config.users, 'utf8'));

async function signingKey() {
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  const jwk = await exportJWK(privateKey);
  jwk.kid = `k${Date.now()}${Math.floor(Math.random() * 1e6)}`;
  jwk.alg = 'RS256';
  jwk.use = 'sig';
  return jwk;
}

function provider(issuer, key) {
  const p = new Provider(issuer, {
    clients: config.clients,
    jwks: { keys: [key] },
    cookies: { keys: ['jitgate-test-op-cookie-key'] },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name'],
      groups: ['groups'],
    },
    scopes: ['openid', 'email', 'profile', 'groups', 'offline_access'],
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
    },
    pkce: { required: () => true },
    // ID tokens carry the claims themselves (jitgate reads no userinfo endpoint).
    conformIdTokenClaims: false,
    ttl: { IdToken: 300, AccessToken: 300, AuthorizationCode: 60, DeviceCode: 300, Interaction: 600, Session: 600, Grant: 600 },
    async findAccount(_ctx, id) {
      const user = users()[id];
      if (!user) return undefined;
      return {
        accountId: id,
        async claims() {
          return { sub: id, email_verified: true, ...user };
        },
      };
    },
    // Consent is given at once: the tests drive the login form only.
    async loadExistingGrant(ctx) {
      const grant = new ctx.oidc.provider.Grant({
        accountId: ctx.oidc.session.accountId,
        clientId: ctx.oidc.client.clientId,
      });
      grant.addOIDCScope(ctx.oidc.params.scope || 'openid');
      grant.addOIDCClaims(['sub', 'email', 'email_verified', 'name', 'groups']);
      await grant.save();
      return grant;
    },
  });
  p.proxy = false;
  return p;
}

const server = http.createServer();
server.listen(0, '127.0.0.1', async () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  let current = provider(issuer, await signingKey());
  server.on('request', async (req, res) => {
    if (req.method === 'POST' && req.url === '/test/rotate') {
      current = provider(issuer, await signingKey());
      res.writeHead(204).end();
      return;
    }
    current.callback()(req, res);
  });
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

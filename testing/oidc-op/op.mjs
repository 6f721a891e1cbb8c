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
//
// Clients may use client_credentials: their access tokens are JWTs (RFC 9068, typ
// at+jwt) for the audience "jitgate-api", signed with the provider's key (workload
// identity).
//
// Faults, for the refusal tests (a provider that is wrong or hostile):
//   POST /test/tamper {"claims": {...}, "alg": "none" | "HS256", "key": "other"}
//     arms a one-shot change of the next ID token the token endpoint returns: claims
//     replaced (null removes one), then signed again with the provider's key, with a
//     key under the same key id that is not the provider's ("key": "other"), with no
//     signature ("alg": "none"), or as HS256 keyed with the client secret.
//   POST /test/sign {"claims": {...}, "alg", "key"} returns {"jwt": ...}: a token with
//     those claims signed as above (iss, iat and exp filled in unless given).

import { readFileSync } from 'node:fs';
import http from 'node:http';
import { generateKeyPair, exportJWK, importJWK, SignJWT, UnsecuredJWT, decodeJwt } from 'jose';
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
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // Only the client `robot` asks for jitgate's API; people's sign-ins do not.
        defaultResource: (_ctx, client) => (client && client.clientId === 'robot' ? 'urn:jitgate:api' : undefined),
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'api',
          audience: 'jitgate-api',
          accessTokenFormat: 'jwt',
          accessTokenTTL: 300,
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
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

let key;
let other;
let armed = null;

// A compact JWT of `claims` signed as `how` says (see the header).
async function sign(claims, how) {
  if (how.alg === 'none') {
    return new UnsecuredJWT(claims).encode();
  }
  if (how.alg === 'HS256') {
    const secret = new TextEncoder().encode(config.clients[0].client_secret);
    return new SignJWT(claims).setProtectedHeader({ alg: 'HS256', kid: key.kid }).sign(secret);
  }
  const jwk = how.key === 'other' ? { ...other, kid: key.kid } : key;
  const header = { alg: 'RS256', kid: jwk.kid, ...(how.header || {}) };
  return new SignJWT(claims).setProtectedHeader(header).sign(await importJWK(jwk, 'RS256'));
}

function merge(claims, changes) {
  const out = { ...claims };
  for (const [k, v] of Object.entries(changes || {})) {
    if (v === null) delete out[k];
    else out[k] = v;
  }
  return out;
}

async function body(req) {
  let text = '';
  for await (const chunk of req) text += chunk;
  return text ? JSON.parse(text) : {};
}

const server = http.createServer();
server.listen(0, '127.0.0.1', async () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  key = await signingKey();
  other = await signingKey();
  let current = provider(issuer, key);
  const tamper = (p) => p.use(async (ctx, next) => {
    await next();
    if (armed && ctx.path === '/token' && ctx.body && ctx.body.id_token) {
      const how = armed;
      armed = null;
      ctx.body = { ...ctx.body, id_token: await sign(merge(decodeJwt(ctx.body.id_token), how.claims), how) };
    }
  });
  tamper(current);
  server.on('request', async (req, res) => {
    if (req.method === 'POST' && req.url === '/test/rotate') {
      key = await signingKey();
      current = provider(issuer, key);
      tamper(current);
      res.writeHead(204).end();
      return;
    }
    if (req.method === 'POST' && req.url === '/test/tamper') {
      armed = await body(req);
      res.writeHead(204).end();
      return;
    }
    if (req.method === 'POST' && req.url === '/test/sign') {
      const how = await body(req);
      const now = Math.floor(Date.now() / 1000);
      const claims = merge({ iss: issuer, iat: now, exp: now + 300 }, how.claims);
      const jwt = await sign(claims, how);
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ jwt }));
      return;
    }
    current.callback()(req, res);
  });
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

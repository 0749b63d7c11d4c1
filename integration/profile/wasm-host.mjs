// Runs a proxy-wasm filter module in node's V8 behind a minimal proxy-wasm host written here, and
// replays one authenticated request many times: a profiler's view (node --cpu-prof) of where the
// filter's own wasm time goes, which `perf` cannot give for Envoy's JIT code.
//
//   node integration/profile/wasm-host.mjs <filter.wasm> <cookie-file> [iterations]
//
// The cookie file holds a `Cookie` header value with a session sealed for app.example.com with
// the secret below (`cargo run -q -p integration --example seal_session_cookie > cookie.txt`).
// Host calls here are JavaScript, so absolute times are not Envoy's; compare modules or builds.
import { readFileSync } from 'node:fs';
import { WASI } from 'node:wasi';

const [wasmPath, cookiePath, iterArg] = process.argv.slice(2);
if (!wasmPath || !cookiePath) {
  console.error('usage: node wasm-host.mjs <filter.wasm> <cookie-file> [iterations]');
  process.exit(2);
}
const iterations = Number(iterArg || 200000);
const cookie = readFileSync(cookiePath, 'utf8').trim();
// The benchmark's configuration (integration/src/bench/scenarios.rs), with an inline secret;
// FILTER_CONFIG replaces it (the no-op filter takes '' or its `--noop-extra` words).
const config = process.env.FILTER_CONFIG ?? JSON.stringify({
  issuer: 'https://idp.example.com', idp_cluster: 'idp', client_id: 'oidc-gate', client_secret: 's',
  cookie_secret: 'MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=',
  hosts: ['app.example.com', '*.apps.example.com'], skip_paths: ['/healthz', '/public/'],
  bearer_tokens: { audiences: ['api://oidc-gate-demo'] },
});
// What Envoy hands a filter at an Istio-shaped gateway for wrk's request.
const headers = [
  [':authority', 'app.example.com'], [':path', '/'], [':method', 'GET'], [':scheme', 'https'],
  ['cookie', cookie], ['x-forwarded-proto', 'https'],
  ['x-request-id', '5f0c8c2e-3f0e-4b8a-9a59-2d1f0e9a7c11'], ['x-forwarded-for', '127.0.0.1'],
];

const OK = 0;
const NOT_FOUND = 1;
const REQUEST_HEADERS = 0;
const PLUGIN_CONFIGURATION = 7;
const enc = new TextEncoder();
const dec = new TextDecoder();
let instance;
const bytes = () => new Uint8Array(instance.exports.memory.buffer);
const view = () => new DataView(instance.exports.memory.buffer);
const text = (ptr, len) => dec.decode(bytes().subarray(ptr, ptr + len));

// Hands bytes to the module the way a host does: in memory the module allocates.
function give(data, ptrPtr, sizePtr) {
  const ptr = instance.exports.proxy_on_memory_allocate(data.length);
  bytes().set(data, ptr);
  view().setUint32(ptrPtr, ptr, true);
  view().setUint32(sizePtr, data.length, true);
  return OK;
}

// proxy-wasm's header map: count, (name length, value length) per pair, then NUL-ended strings.
function serialise(pairs) {
  const encoded = pairs.map(([k, v]) => [enc.encode(k), enc.encode(v)]);
  let size = 4 + encoded.length * 8;
  for (const [k, v] of encoded) size += k.length + v.length + 2;
  const out = new Uint8Array(size);
  const d = new DataView(out.buffer);
  d.setUint32(0, encoded.length, true);
  let at = 4;
  for (const [k, v] of encoded) {
    d.setUint32(at, k.length, true);
    d.setUint32(at + 4, v.length, true);
    at += 8;
  }
  for (const [k, v] of encoded) {
    out.set(k, at);
    at += k.length + 1;
    out.set(v, at);
    at += v.length + 1;
  }
  return out;
}

const requestHeaders = serialise(headers);
const calls = {};
const host = {
  proxy_log: (level, ptr, len) => {
    if (level >= 3) console.error(`filter log ${level}: ${text(ptr, len)}`);
    return OK;
  },
  proxy_get_log_level: (ptr) => { view().setUint32(ptr, 2, true); return OK; },
  proxy_get_current_time_nanoseconds: (ptr) => {
    view().setBigUint64(ptr, BigInt(Date.now()) * 1000000n, true);
    return OK;
  },
  proxy_get_buffer_bytes: (type, _start, _max, ptrPtr, sizePtr) =>
    give(enc.encode(type === PLUGIN_CONFIGURATION ? config : ''), ptrPtr, sizePtr),
  proxy_get_header_map_pairs: (type, ptrPtr, sizePtr) =>
    give(type === REQUEST_HEADERS ? requestHeaders : serialise([]), ptrPtr, sizePtr),
  proxy_get_header_map_value: (type, keyPtr, keyLen, ptrPtr, sizePtr) => {
    const key = text(keyPtr, keyLen);
    const found = type === REQUEST_HEADERS && headers.find(([n]) => n === key);
    return found ? give(enc.encode(found[1]), ptrPtr, sizePtr) : NOT_FOUND;
  },
  // No IdP documents: the filter then looks for them on every request (two calls per request
  // here); with documents cached, Envoy sees that once per VM every 5 s.
  proxy_get_shared_data: () => NOT_FOUND,
  proxy_get_property: () => NOT_FOUND,
  proxy_define_metric: (_type, _namePtr, _nameLen, idPtr) => {
    view().setUint32(idPtr, 1, true);
    return OK;
  },
};

const module = new WebAssembly.Module(readFileSync(wasmPath));
const wasi = new WASI({ version: 'preview1', args: [], env: {} });
const imports = { wasi_snapshot_preview1: wasi.wasiImport, env: {} };
for (const imp of WebAssembly.Module.imports(module)) {
  if (imp.module !== 'env') continue;
  const impl = host[imp.name] || (() => OK);
  imports.env[imp.name] = (...args) => {
    calls[imp.name] = (calls[imp.name] || 0) + 1;
    return impl(...args);
  };
}
instance = new WebAssembly.Instance(module, imports);
wasi.initialize({
  exports: { memory: instance.exports.memory, _initialize: instance.exports._initialize },
});
const x = instance.exports;
const ROOT = 1;
x.proxy_on_context_create(ROOT, 0);
if (!x.proxy_on_vm_start(ROOT, 0) || !x.proxy_on_configure(ROOT, config.length)) {
  throw new Error('the filter refused its configuration');
}

function request(id) {
  x.proxy_on_context_create(id, ROOT);
  const action = x.proxy_on_request_headers(id, headers.length, 1);
  x.proxy_on_response_headers(id, 3, 1);
  x.proxy_on_log(id);
  x.proxy_on_done(id);
  x.proxy_on_delete(id);
  return action;
}

let id = ROOT + 1;
for (let i = 0; i < Math.max(1000, iterations / 10); i++) {
  if (request(id++) !== 0) throw new Error('the request was not continued: is the cookie valid?');
}
for (const k of Object.keys(calls)) delete calls[k];
const start = process.hrtime.bigint();
for (let i = 0; i < iterations; i++) request(id++);
const ns = Number(process.hrtime.bigint() - start) / iterations;
const perRequest = Object.fromEntries(
  Object.entries(calls).map(([k, v]) => [k, +(v / iterations).toFixed(2)]),
);
console.log(`${wasmPath}: ${ns.toFixed(0)} ns per request; host calls per request:`, perRequest);

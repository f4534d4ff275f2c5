// Assembles web/wasm/sha256.wat with wabt's wat2wasm (the npm package pinned in
// web/wasm/package.json) and writes the module, base64, into the SHA256_WASM line of
// web/tern.js. `--check` only verifies that tern.js carries the current build.
//
// usage: (cd web/wasm && npm ci) && node web/wasm/build.mjs [--check]
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import wabtInit from 'wabt';

const here = dirname(fileURLToPath(import.meta.url));
const wat = join(here, 'sha256.wat');
const lib = join(here, '..', 'tern.js');
const wabt = await wabtInit();
const mod = wabt.parseWat('sha256.wat', readFileSync(wat, 'utf8'));
mod.validate();
const b64 = Buffer.from(mod.toBinary({}).buffer).toString('base64');
mod.destroy();
const src = readFileSync(lib, 'utf8');
const line = /^const SHA256_WASM = '[A-Za-z0-9+/=]*';$/m;
if (!line.test(src)) throw new Error('no SHA256_WASM line in web/tern.js');
const next = src.replace(line, `const SHA256_WASM = '${b64}';`);
if (process.argv.includes('--check')) {
  if (next !== src) {
    console.error('web/tern.js does not carry the current build of web/wasm/sha256.wat: run node web/wasm/build.mjs');
    process.exit(1);
  }
  console.log(`web/tern.js carries sha256.wat (${b64.length} base64 characters)`);
} else {
  writeFileSync(lib, next);
  console.log(`web/tern.js: SHA256_WASM updated (${Buffer.from(b64, 'base64').length} bytes of WebAssembly)`);
}

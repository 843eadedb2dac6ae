// Bundles the console's script (src/main.ts) into ../src/console/assets/app.js
// (esbuild, minified, one file with protobuf-es and Connect's gRPC-Web
// transport). The gateway embeds index.html and app.css straight from src/.
//   node build.mjs           writes the assets
//   node build.mjs --check   fails when the committed assets differ from a rebuild
import * as esbuild from "esbuild";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "src", "console", "assets");
const check = process.argv.includes("--check");

const result = await esbuild.build({
  entryPoints: [join(here, "src", "main.ts")],
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2022"],
  legalComments: "eof",
  write: false,
  logLevel: "warning",
});
const files = {
  "app.js": result.outputFiles[0].contents,
};
let stale = [];
for (const [name, bytes] of Object.entries(files)) {
  const path = join(out, name);
  if (check) {
    let committed = null;
    try {
      committed = readFileSync(path);
    } catch {}
    if (!committed || Buffer.compare(committed, Buffer.from(bytes)) !== 0) stale.push(name);
  } else {
    mkdirSync(out, { recursive: true });
    writeFileSync(path, bytes);
  }
}
if (check && stale.length) {
  console.error(`console: committed assets differ from a rebuild: ${stale.join(", ")} (run scripts/console-build.sh)`);
  process.exit(1);
}
console.log(check ? "console: committed assets match a rebuild" : `console: wrote ${Object.keys(files).join(", ")} to src/console/assets/`);

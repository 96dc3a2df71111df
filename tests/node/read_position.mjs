// A ddk-cache format-3 reader in another language, written from docs/cache-format.md alone (zarrita, a JavaScript
// Zarr v3 implementation): window WINDOW of DOMAIN/SPLIT as entries (ids, log-probs) and target log-prob per position,
// on stdout as JSON.
//   node read_position.mjs STORE DOMAIN SPLIT WINDOW
import * as zarr from "zarrita";
import FileSystemStore from "@zarrita/storage/fs";

const [storePath, domain, split, windowText] = process.argv.slice(2);
const window = Number(windowText);
const root = zarr.root(new FileSystemStore(storePath));
const header = (await zarr.open(root, { kind: "group" })).attrs.ddk_cache;
if (header.format_version !== 3) throw new Error(`format version ${header.format_version}: this reader reads version 3`);

async function row(name) {  // one window of an array: its stored values, and the array's encoding attribute
  const array = await zarr.open(root.resolve(`${domain}/${split}/${name}`), { kind: "array" });
  const chunk = await zarr.get(array, [zarr.slice(window, window + 1), ...array.shape.slice(1).map(() => null)]);
  return { data: Array.from(chunk.data, Number), shape: chunk.shape.slice(1), encoding: array.attrs.ddk_cache_encoding, dtype: array.dtype };
}

function fixedScale(stored) {  // "Encodings": stored / S
  if (stored.encoding?.name !== "fixed_scale") throw new Error(`expected fixed_scale, got ${JSON.stringify(stored.encoding)}`);
  return stored.data.map((v) => v / stored.encoding.scale);
}

const ids = await row("ids"), nEntries = await row("n_entries"), target = await row("target_logprobs");
if (ids.encoding?.name !== "delta") throw new Error("ids are not delta-encoded");
const [seqLen, width] = ids.shape;
const mode = header.capture.mode;
const values = mode === "sampled" ? (await row("counts")).data : fixedScale(await row("logprobs"));
// "Encodings": the sum wraps modulo 2^16 in a uint16 array (headtail's first tail id is below the last head id)
const modulus = ids.dtype === "uint16" ? 65536 : 2 ** 32;
// rest_logprobs is float16, which zarrita 0.5 cannot read (JavaScript has no float16 array in Node 20): left out
const targets = fixedScale(target);
const positions = [];
for (let t = 0; t < seqLen; t++) {
  const n = nEntries.data[t];
  let id = 0;
  const entryIds = [], entryValues = [];
  for (let j = 0; j < width; j++) {  // the cumulative sum of the deltas along the position
    id = (id + ids.data[t * width + j]) % modulus;
    if (j < n) { entryIds.push(id); entryValues.push(mode === "sampled" ? Math.log(values[t * width + j] / header.capture.draws) : values[t * width + j]); }
  }
  // headtail: the first header.capture.k entries are the head's log-probs, the others each tail id's log(count / draws)
  positions.push({ ids: entryIds, logprobs: entryValues, target: targets[t] });
}
console.log(JSON.stringify({ mode, positions }));

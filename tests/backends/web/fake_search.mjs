// Runs blip.js's greedy and beam search over a decoder whose logits are an integer hash of each row's
// tokens so far, which tests/backends/test_web.py computes the same way in Python for BlipRuntime's search.
// argv: SITE_DIR; stdin: JSON list of {prompt, options}; stdout: JSON list of token id lists.
import { pathToFileURL } from 'node:url';

const { search } = await import(pathToFileURL(`${process.argv[2]}/blip.js`).href);
const VOCAB = 40, EOS = 3;

export function logits(history) {
  let s = 17;
  for (const t of history) s = (s * 31 + t + 7) % 1000003;
  const out = new Float32Array(VOCAB);
  for (let v = 0; v < VOCAB; v++) out[v] = (((s * 131 + v * 977 + (s % 89) * v * v) % 1000003) / 1000003) * 6;
  out[EOS] = Math.fround(out[EOS] + history.length * 0.1);
  return out;
}

// The cache holds each row's tokens in a tensor [rows, 1, length, 1], which the search reorders as it
// would real keys and values.
const { Tensor } = await import(pathToFileURL(`${process.argv[2]}/ort/ort.wasm.bundle.min.mjs`).href);
const asCache = (rows) => ({
  self: [new Tensor('float32', Float32Array.from(rows.flat()), [rows.length, 1, rows[0].length, 1])], cross: [],
});
const rowsOf = (cache) => {
  const [n, , length] = cache.self[0].dims;
  return Array.from({ length: n }, (_, r) => Array.from(cache.self[0].data.subarray(r * length, (r + 1) * length)));
};
const decoder = {
  async start(prompt) { return { logits: [logits(prompt)], cache: asCache([prompt]) }; },
  async advance(tokens, cache) {
    const rows = rowsOf(cache).map((row, i) => [...row, tokens[i]]);
    return { logits: rows.map(logits), cache: asCache(rows) };
  },
};

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const answers = [];
for (const { prompt, options } of JSON.parse(Buffer.concat(chunks).toString('utf8'))) {
  answers.push((await search(decoder, null, prompt, options, EOS, 0)).token_ids);
}
process.stdout.write(JSON.stringify(answers));

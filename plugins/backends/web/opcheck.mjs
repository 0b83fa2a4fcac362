// Loads ONNX graphs in ONNX Runtime Web's WASM build under Node, the binary the site ships, and
// says for each whether a session could be created, with the error (which names the op) if not.
//
// Input (stdin, JSON): {"models": {name: path}}. Output (stdout, JSON): {"ort": version, "models": {name: null | error}}.
import { readFile } from 'node:fs/promises';
import * as ort from 'onnxruntime-web';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const request = JSON.parse(Buffer.concat(chunks).toString('utf8'));
ort.env.wasm.numThreads = 1;
const answer = { ort: ort.env.versions?.web ?? null, models: {} };
for (const [name, path] of Object.entries(request.models)) {
  try {
    const session = await ort.InferenceSession.create(new Uint8Array(await readFile(path)), { executionProviders: ['wasm'] });
    await session.release();
    answer.models[name] = null;
  } catch (error) {
    answer.models[name] = String(error.message || error);
  }
}
process.stdout.write(JSON.stringify(answer));

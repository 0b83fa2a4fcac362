// BLIP in the browser: caption images and score image-text pairs with ONNX Runtime Web (WASM EP).
//
// An ES module with no build step. It does what plugins/blip/runtime does in Python, step for step,
// so that a page gives the captions and scores `convert caption` / `convert match` give:
// - models and the vocabulary are fetched from manifest.json and refused unless their sha256
//   (SubtleCrypto) is the manifest's;
// - images are decoded to Pillow's modes (PNG by our own decoder: a canvas premultiplies alpha and
//   may colour-manage), made RGB with transparency composited onto white as Pillow's
//   alpha_composite does, resized with Pillow's bicubic filter in its 8-bit fixed-point arithmetic
//   (canvas scaling filters differ by browser), rescaled in float64 and normalised in float32;
// - text is split into BERT word pieces from the shipped vocab.txt;
// - captions follow plugins/blip/runtime/decoding.py (transformers' generate): greedy or beam
//   search over the two decoder graphs with the KV cache, repetition penalty then min_tokens,
//   max_tokens counting new tokens with [SEP], length penalty on finished beams.

import * as ort from './ort/ort.wasm.bundle.min.mjs';

const NEG = Math.fround(-1.0e9);
export const MAX_BEAMS = 16;

export class BlipError extends Error {}

// ---------------------------------------------------------------------------------------------
// Loading

async function sha256Hex(buffer) {
  const digest = await crypto.subtle.digest('SHA-256', buffer);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

async function fetchChecked(base, file, expected) {
  const url = new URL(file, base);
  const response = await fetch(url);
  if (!response.ok) throw new BlipError(`${file}: HTTP ${response.status}`);
  const buffer = await response.arrayBuffer();
  const found = await sha256Hex(buffer);
  if (found !== expected) {
    throw new BlipError(`${file}: its sha256 is ${found}, the manifest's ${expected}; the file changed after conversion`);
  }
  return buffer;
}

export class Blip {
  // Use `await Blip.load(siteUrl)`.
  constructor(manifest, sessions, vocab, ortVersion) {
    this.manifest = manifest;
    this.sessions = sessions;
    // No vocabulary (a random-weight conversion ships none): captions are token ids only, no matching.
    this.tokenizer = vocab === null ? null : new WordPiece(vocab, manifest.tokenizer, manifest.tokens, maxTextLen(manifest.generation));
    this.preprocessing = manifest.preprocessing;
    this.tokens = manifest.tokens;
    this.generation = manifest.generation;
    this.ortVersion = ortVersion;
  }

  static async load(siteUrl = new URL('./', import.meta.url), { threads = 1, onProgress = () => {} } = {}) {
    const base = new URL('./', siteUrl);
    const response = await fetch(new URL('manifest.json', base));
    if (!response.ok) throw new BlipError(`manifest.json: HTTP ${response.status}`);
    const manifest = await response.json();
    ort.env.wasm.numThreads = threads;
    ort.env.wasm.wasmPaths = { wasm: new URL(manifest.runtime.wasm, base).href };
    const sessions = {};
    for (const [name, model] of Object.entries(manifest.models)) {
      onProgress(`loading ${name}`);
      const bytes = await fetchChecked(base, model.file, model.sha256);
      const externalData = [];
      for (const data of model.data_files || []) {
        externalData.push({ path: data.name, data: new Uint8Array(await fetchChecked(base, data.file, data.sha256)) });
      }
      try {
        sessions[name] = await ort.InferenceSession.create(new Uint8Array(bytes), {
          executionProviders: ['wasm'], graphOptimizationLevel: 'all', externalData,
        });
      } catch (error) {
        throw new BlipError(`${name}: ONNX Runtime Web cannot load it: ${error.message || error}`);
      }
    }
    const vocab = manifest.tokenizer
      ? new TextDecoder().decode(await fetchChecked(base, manifest.tokenizer.file, manifest.tokenizer.sha256)) : null;
    return new Blip(manifest, sessions, vocab, ort.env.versions?.web);
  }

  has(module) {
    return module in this.sessions;
  }

  async pixelValues(image) {
    const rgb = toRgb(await decodeImage(image));
    return preprocess(rgb, this.preprocessing);
  }

  async imageEmbeds(pixels, module = 'vision_encoder') {
    const size = this.preprocessing.image_size;
    const input = new ort.Tensor('float32', pixels, [1, 3, size, size]);
    const out = await this.sessions[module].run({ pixel_values: input });
    return requireFinite(out.image_embeds, module, 'image_embeds');
  }

  promptIds() {
    if (this.generation.prompt_ids) return [...this.generation.prompt_ids];
    const prompt = this.generation.prompt || '';
    if (!prompt) return [this.tokens.DEC];
    if (!this.tokenizer) throw new BlipError('this site ships no vocabulary to tokenise the prompt with');
    const ids = this.tokenizer.encode(prompt);
    if (ids[ids.length - 1] === this.tokens.SEP) ids.pop();
    return [this.tokens.DEC, ...ids.slice(1)];
  }

  // One caption of one image: {token_ids, text, score}. Options as BlipRuntime.caption's.
  async caption(image, { beams = 1, maxTokens = 20, minTokens = 0, repetitionPenalty = 1.0, lengthPenalty = 1.0, pixels = null } = {}) {
    for (const module of ['text_decoder', 'text_decoder_with_past']) {
      if (!this.has(module)) throw new BlipError(`this site has no ${module}: the checkpoint had no captioning decoder`);
    }
    const options = checkOptions({ beams, maxTokens, minTokens, repetitionPenalty, lengthPenalty });
    const prompt = this.promptIds();
    if (prompt.length + maxTokens > maxTextLen(this.generation)) {
      throw new BlipError(`prompt (${prompt.length} tokens) + max_tokens (${maxTokens}) exceeds the ${maxTextLen(this.generation)} positions this output was validated for`);
    }
    const embeds = await this.imageEmbeds(pixels || await this.pixelValues(image));
    const decoder = new CachedDecoder(this.sessions.text_decoder, this.sessions.text_decoder_with_past, this.generation.num_layers);
    const eos = this.generation.eos_token_id;
    const decoded = await search(decoder, embeds, prompt, options, eos, this.tokens.PAD);
    return { ...decoded, text: this.captionText(prompt, decoded.token_ids) };
  }

  captionText(promptIds, tokenIds) {
    if (!this.tokenizer) return null;
    const whole = this.tokenizer.decode([...promptIds, ...tokenIds]);
    const head = this.tokenizer.decode(promptIds);
    if (head && whole.startsWith(head)) return whole.slice(head.length).trim();
    return this.tokenizer.decode(tokenIds).trim();
  }

  // ITM probability and ITC similarity of each text with one image: [{text, itm_probability, itc_similarity}].
  async match(image, texts, { pixels = null } = {}) {
    if (!this.has('text_encoder')) throw new BlipError('this site has no text_encoder (ITM/ITC need a retrieval or pretrain checkpoint)');
    if (!texts.length) return [];
    if (!this.tokenizer) throw new BlipError('this site ships no vocabulary: texts cannot be tokenised');
    const vision = this.has('retrieval_vision_encoder') ? 'retrieval_vision_encoder' : 'vision_encoder';
    const embeds = await this.imageEmbeds(pixels || await this.pixelValues(image), vision);
    const { inputIds, attentionMask, width } = this.tokenizer.batch(texts);
    const n = texts.length;
    const [, tokens, hidden] = embeds.dims;
    const repeated = new Float32Array(n * tokens * hidden);
    for (let i = 0; i < n; i++) repeated.set(embeds.data, i * tokens * hidden);
    const out = await this.sessions.text_encoder.run({
      input_ids: new ort.Tensor('int64', inputIds, [n, width]),
      attention_mask: new ort.Tensor('int64', attentionMask, [n, width]),
      image_embeds: new ort.Tensor('float32', repeated, [n, tokens, hidden]),
    });
    requireFinite(out.itm_probability, 'text_encoder', 'itm_probability');
    const dim = out.text_features.dims[1];
    return texts.map((text, i) => {
      let itc = 0;
      for (let j = 0; j < dim; j++) itc += out.text_features.data[i * dim + j] * out.image_features.data[i * dim + j];
      return { text, itm_probability: out.itm_probability.data[i], itc_similarity: Math.fround(itc) };
    });
  }
}

function maxTextLen(generation) {
  return Math.min(generation.max_position_embeddings, generation.max_text_len);
}

function requireFinite(tensor, module, output) {
  for (const value of tensor.data) {
    if (!Number.isFinite(value)) throw new BlipError(`${module} gave NaN or Inf in ${output}: the model is broken`);
  }
  return tensor;
}

function checkOptions(o) {
  for (const key of ['beams', 'maxTokens', 'minTokens']) {
    if (!Number.isInteger(o[key])) throw new BlipError(`${key} must be an integer`);
  }
  if (o.beams < 1 || o.beams > MAX_BEAMS) throw new BlipError(`beams must be between 1 and ${MAX_BEAMS}, got ${o.beams}`);
  if (o.maxTokens < 1 || o.minTokens < 0) throw new BlipError('max_tokens must be >= 1 and min_tokens >= 0');
  if (!Number.isFinite(o.repetitionPenalty) || o.repetitionPenalty <= 0 || !Number.isFinite(o.lengthPenalty)) {
    throw new BlipError('repetition_penalty must be a finite number > 0 and length_penalty finite');
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// Images: decoding to Pillow's modes

// Returns {width, height, channels, data: Uint8Array, alpha: bool, transparent: null | [values]}:
// channels 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA); `transparent` is a PNG tRNS colour key.
export async function decodeImage(source) {
  let bytes;
  if (source instanceof Uint8Array) bytes = source;
  else if (source instanceof ArrayBuffer) bytes = new Uint8Array(source);
  else if (source instanceof Blob) bytes = new Uint8Array(await source.arrayBuffer());
  else {
    const response = await fetch(source);
    if (!response.ok) throw new BlipError(`${source}: HTTP ${response.status}`);
    bytes = new Uint8Array(await response.arrayBuffer());
  }
  if (isPng(bytes)) {
    const png = await decodePng(bytes);
    if (png) return png;
  }
  return decodeWithBrowser(bytes);
}

// Formats other than (non-interlaced) PNG: the browser decodes them; colour conversion is off.
// Opaque images (JPEG) come out as the decoder wrote them; premultiplied alpha may round.
async function decodeWithBrowser(bytes) {
  const bitmap = await createImageBitmap(new Blob([bytes]), { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext('2d');
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  let alpha = false;
  for (let i = 3; i < rgba.length; i += 4) if (rgba[i] !== 255) { alpha = true; break; }
  return { width: bitmap.width, height: bitmap.height, channels: 4, data: new Uint8Array(rgba.buffer), alpha, transparent: null };
}

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

function isPng(bytes) {
  return PNG_SIGNATURE.every((b, i) => bytes[i] === b);
}

async function inflate(data) {
  const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream('deflate'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// A PNG as Pillow opens it (modes 1, L, LA, RGB, RGBA, P with its palette and tRNS). Returns
// null for what it does not handle (interlaced files): the browser decodes those.
export async function decodePng(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let offset = 8;
  let header = null;
  let palette = null;
  let trns = null;
  const idat = [];
  while (offset + 8 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
    const body = bytes.subarray(offset + 8, offset + 8 + length);
    offset += 12 + length;
    if (type === 'IHDR') {
      header = { width: view.getUint32(16), height: view.getUint32(20), depth: body[8], colour: body[9], interlace: body[12] };
    } else if (type === 'PLTE') palette = body;
    else if (type === 'tRNS') trns = body;
    else if (type === 'IDAT') idat.push(body);
    else if (type === 'IEND') break;
  }
  if (!header) throw new BlipError('not a PNG: no IHDR');
  if (header.interlace) return null;
  const { width, height, depth, colour } = header;
  const samples = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 }[colour];
  if (!samples) throw new BlipError(`PNG colour type ${colour} is not valid`);
  const joined = new Uint8Array(idat.reduce((n, c) => n + c.length, 0));
  idat.reduce((at, c) => (joined.set(c, at), at + c.length), 0);
  const raw = await inflate(joined);
  const bitsPerPixel = samples * depth;
  const stride = Math.ceil((width * bitsPerPixel) / 8);
  const bpp = Math.max(1, bitsPerPixel >> 3);
  const lines = unfilter(raw, height, stride, bpp);

  // Samples of one row as numbers, at the file's bit depth.
  const sample = (row, index) => {
    if (depth === 8) return lines[row * stride + index];
    if (depth === 16) return (lines[row * stride + 2 * index] << 8) | lines[row * stride + 2 * index + 1];
    const perByte = 8 / depth;
    const byte = lines[row * stride + Math.floor(index / perByte)];
    const shift = 8 - depth * ((index % perByte) + 1);
    return (byte >> shift) & ((1 << depth) - 1);
  };
  const count = width * height;
  if (colour === 3) {  // P: expand the palette; tRNS gives each entry an alpha
    if (!palette) throw new BlipError('PNG: palette image without PLTE');
    const data = new Uint8Array(count * 4);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const index = sample(y, x);
        const o = (y * width + x) * 4;
        data[o] = palette[index * 3]; data[o + 1] = palette[index * 3 + 1]; data[o + 2] = palette[index * 3 + 2];
        data[o + 3] = trns && index < trns.length ? trns[index] : 255;
      }
    }
    return { width, height, channels: 4, data, alpha: !!trns, transparent: null };
  }
  // Pillow's 8-bit value of a sample: bit depths below 8 are scaled up (1-bit is mode "1": 0 or
  // 255), 16-bit grey is scaled by 1/257 as the Python runtime does for I;16, 16-bit colour keeps
  // its high byte (Pillow's RGB;16B raw mode).
  const grey = colour === 0 || colour === 4;
  const to8 = depth === 8 ? (v) => v
    : depth === 16 ? (grey && colour === 0 ? (v) => Math.round(v / 257) : (v) => v >> 8)
      : (v) => Math.round((v * 255) / ((1 << depth) - 1));
  const data = new Uint8Array(count * samples);
  for (let y = 0; y < height; y++) {
    for (let i = 0; i < width * samples; i++) data[y * width * samples + i] = to8(sample(y, i));
  }
  let transparent = null;
  if (trns && (colour === 0 || colour === 2)) {
    // The key is compared with the samples at the file's depth; stored as 8-bit like the data.
    const key = [];
    for (let i = 0; i < (colour === 0 ? 1 : 3); i++) key.push(to8(((trns[2 * i] << 8) | trns[2 * i + 1]) & ((1 << depth) - 1 || 0xffff)));
    transparent = key;
  }
  return { width, height, channels: samples, data, alpha: samples === 2 || samples === 4, transparent };
}

function unfilter(raw, height, stride, bpp) {
  const out = new Uint8Array(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const o = y * stride;
    for (let x = 0; x < stride; x++) {
      const a = x >= bpp ? out[o + x - bpp] : 0;
      const b = y > 0 ? out[o - stride + x] : 0;
      const c = x >= bpp && y > 0 ? out[o - stride + x - bpp] : 0;
      let value = line[x];
      if (filter === 1) value += a;
      else if (filter === 2) value += b;
      else if (filter === 3) value += (a + b) >> 1;
      else if (filter === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
        value += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      } else if (filter !== 0) throw new BlipError(`PNG: unknown filter ${filter}`);
      out[o + x] = value & 255;
    }
  }
  return out;
}

// RGB uint8 [height, width, 3], as plugins/blip/runtime/preprocess.py's to_rgb: images with alpha
// (or a tRNS key) are composited onto white with Pillow's integer alpha_composite.
export function toRgb(image) {
  const { width, height, channels, data } = image;
  const count = width * height;
  const rgb = new Uint8Array(count * 3);
  const keyed = image.transparent;
  for (let i = 0; i < count; i++) {
    let r, g, b, a;
    if (channels <= 2) { r = g = b = data[i * channels]; a = channels === 2 ? data[i * 2 + 1] : 255; }
    else { r = data[i * channels]; g = data[i * channels + 1]; b = data[i * channels + 2]; a = channels === 4 ? data[i * 4 + 3] : 255; }
    if (keyed && (keyed.length === 1 ? r === keyed[0] : r === keyed[0] && g === keyed[1] && b === keyed[2])) a = 0;
    if (image.alpha || keyed) [r, g, b] = compositeOnWhite(r, g, b, a);
    rgb[i * 3] = r; rgb[i * 3 + 1] = g; rgb[i * 3 + 2] = b;
  }
  return { width, height, data: rgb };
}

// Pillow's ImagingAlphaComposite (libImaging/AlphaComposite.c) of one pixel over opaque white.
function compositeOnWhite(r, g, b, a) {
  if (a === 0) return [255, 255, 255];
  const shift = 7;
  const blend = 255 * (255 - a);
  const outa255 = a * 255 + blend;
  const coef1 = Math.floor((a * 255 * 255 * (1 << shift)) / outa255);
  const coef2 = 255 * (1 << shift) - coef1;
  const one = (s) => {
    const t = s * coef1 + 255 * coef2 + (0x80 << shift);
    return ((((t >>> 8) + t) >>> 8) >>> shift);
  };
  return [one(r), one(g), one(b)];
}

// ---------------------------------------------------------------------------------------------
// Resizing: Pillow's ImagingResample (libImaging/Resample.c) for 8-bit images, bicubic (a = -0.5)

const PRECISION_BITS = 32 - 8 - 2;

function bicubic(x) {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

// Per output pixel: the first input pixel, how many, and their fixed-point weights.
function coefficients(inSize, outSize) {
  const support = 2;
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const reach = support * filterscale;
  const ksize = Math.ceil(reach) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - reach + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + reach + 0.5)) - xmin;
    const k = new Float64Array(xmax);
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      k[x] = bicubic((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0 ? k[x] / ww : k[x];
      weights[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS)) : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, weights };
}

function clip8(value) {
  const v = value >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function horizontalPass(data, width, rows, start, outW, { ksize, bounds, weights }) {
  const out = new Uint8Array(rows * outW * 3);
  for (let y = 0; y < rows; y++) {
    const src = (y + start) * width * 3;
    for (let xx = 0; xx < outW; xx++) {
      const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1];
      let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
      for (let x = 0; x < xmax; x++) {
        const w = weights[xx * ksize + x];
        const p = src + (x + xmin) * 3;
        s0 += data[p] * w; s1 += data[p + 1] * w; s2 += data[p + 2] * w;
      }
      const o = (y * outW + xx) * 3;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
    }
  }
  return out;
}

// `shift`: the first input row the vertical bounds count from.
function verticalPass(data, width, outH, shift, { ksize, bounds, weights }) {
  const out = new Uint8Array(outH * width * 3);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[yy * 2] - shift, ymax = bounds[yy * 2 + 1];
    for (let xx = 0; xx < width; xx++) {
      let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
      for (let y = 0; y < ymax; y++) {
        const w = weights[yy * ksize + y];
        const p = ((y + ymin) * width + xx) * 3;
        s0 += data[p] * w; s1 += data[p + 1] * w; s2 += data[p + 2] * w;
      }
      const o = (yy * width + xx) * 3;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
    }
  }
  return out;
}

// RGB uint8 {width, height, data} -> RGB uint8 {width: outW, height: outH, data}, as Pillow 13's
// ImagingResampleInner: each pass rounds to 8 bits, so the order of the passes shows in the
// result. Pillow runs the vertical pass first when the height shrinks by more than twice as many
// pixels as the width (Pillow before that change always ran the horizontal pass first).
export function resizeBicubic(image, outW, outH) {
  const { width, height } = image;
  let data = image.data;
  const needH = outW !== width;
  const needV = outH !== height;
  const horizontalFirst = !((height - outH) > 0 && (height - outH) > (width - outW) * 2);
  const vertical = coefficients(height, outH);
  const horizontal = coefficients(width, outW);
  if (horizontalFirst) {
    // Only the input rows the vertical pass reads.
    const first = vertical.bounds[0];
    const last = vertical.bounds[outH * 2 - 2] + vertical.bounds[outH * 2 - 1];
    let shift = 0;
    if (needH) {
      data = horizontalPass(data, width, last - first, first, outW, horizontal);
      shift = first;
    }
    if (needV) data = verticalPass(data, needH ? outW : width, outH, shift, vertical);
  } else {
    if (needV) data = verticalPass(data, width, outH, 0, vertical);
    if (needH) data = horizontalPass(data, width, outH, 0, outW, horizontal);
  }
  return { width: outW, height: outH, data };
}

// RGB uint8 -> float32 [3, S, S] (NCHW without the batch axis), as Preprocessor.one.
export function preprocess(rgb, settings) {
  if (settings.resize !== 'bicubic' || settings.crop !== null || (settings.channel_order || 'RGB') !== 'RGB'
      || (settings.layout || 'NCHW') !== 'NCHW') {
    throw new BlipError(`unsupported preprocessing in the manifest: ${JSON.stringify(settings)}`);
  }
  const size = settings.image_size;
  const resized = resizeBicubic(rgb, size, size);
  const mean = settings.mean.map(Math.fround), std = settings.std.map(Math.fround);
  const plane = size * size;
  const out = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const scaled = Math.fround(resized.data[i * 3 + c] * settings.rescale);  // float64 product, then float32
      out[c * plane + i] = Math.fround(Math.fround(scaled - mean[c]) / std[c]);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Text: BERT word pieces (the tokenizers library's BertWordPieceTokenizer, lower-cased)

const SPECIAL = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'];

export class WordPiece {
  constructor(vocabText, config, tokens, maxLength) {
    this.vocab = vocabText.split('\n');
    if (this.vocab[this.vocab.length - 1] === '') this.vocab.pop();
    this.ids = new Map(this.vocab.map((token, id) => [token.replace(/\r$/, ''), id]));
    this.lowercase = config.do_lower_case !== false;
    this.tokens = tokens;
    this.maxLength = maxLength;
    this.unk = this.ids.get('[UNK]');
    this.hidden = new Set(['DEC', 'ENC', 'SEP', 'PAD', 'CLS'].filter((n) => n in tokens).map((n) => tokens[n]));
    for (const token of SPECIAL) if (this.ids.has(token)) this.hidden.add(this.ids.get(token));
  }

  words(text) {
    // BertNormalizer: control characters out, whitespace to spaces, CJK characters split off,
    // lower case with accents stripped.
    let clean = '';
    for (const ch of text) {
      const code = ch.codePointAt(0);
      if (code === 0 || code === 0xfffd || (isControl(ch))) continue;
      clean += /\s/u.test(ch) ? ' ' : isCjk(code) ? ` ${ch} ` : ch;
    }
    if (this.lowercase) clean = clean.normalize('NFD').replace(/\p{Mn}/gu, '').toLowerCase();
    // BertPreTokenizer: split on whitespace, every punctuation character its own word.
    return clean.split(/\s+/u).filter(Boolean).flatMap((word) => word.split(/([\p{P}!-/:-@[-`{-~])/u).filter(Boolean));
  }

  pieces(word) {
    if ([...word].length > 100) return [this.unk];
    const out = [];
    let start = 0;
    const chars = [...word];
    while (start < chars.length) {
      let end = chars.length;
      let found = null;
      while (start < end) {
        const piece = (start > 0 ? '##' : '') + chars.slice(start, end).join('');
        if (this.ids.has(piece)) { found = this.ids.get(piece); break; }
        end--;
      }
      if (found === null) return [this.unk];
      out.push(found);
      start = end;
    }
    return out;
  }

  // [CLS] text [SEP], cut to the model's longest text keeping the final [SEP].
  encode(text) {
    const ids = [this.ids.get('[CLS]'), ...this.words(text).flatMap((w) => this.pieces(w)), this.ids.get('[SEP]')];
    if (ids.length > this.maxLength) return [...ids.slice(0, this.maxLength - 1), ids[ids.length - 1]];
    return ids;
  }

  batch(texts) {
    const encoded = texts.map((t) => this.encode(t));
    const width = Math.max(...encoded.map((ids) => ids.length));
    const inputIds = new BigInt64Array(texts.length * width).fill(BigInt(this.tokens.PAD));
    const attentionMask = new BigInt64Array(texts.length * width);
    encoded.forEach((ids, row) => ids.forEach((id, i) => {
      inputIds[row * width + i] = BigInt(id);
      attentionMask[row * width + i] = 1n;
    }));
    return { inputIds, attentionMask, width };
  }

  // As the Python runtime: the tokenizers WordPiece decoder (with its clean-up), then
  // transformers' clean_up_tokenization.
  decode(ids) {
    const tokens = ids.filter((id) => !this.hidden.has(id) && id >= 0 && id < this.vocab.length).map((id) => this.vocab[id]);
    let text = tokens.map((t, i) => (i > 0 && t.startsWith('##') ? t.slice(2) : i > 0 ? ` ${t}` : t)).join('');
    const tokenizersCleanup = [[' .', '.'], [' ?', '?'], [' !', '!'], [' ,', ','], [" ' ", "'"], [" n't", "n't"],
      [" 'm", "'m"], [' do not', " don't"], [" 's", "'s"], [" 've", "'ve"], [" 're", "'re"]];
    const transformersCleanup = [[' .', '.'], [' ?', '?'], [' !', '!'], [' ,', ','], [" ' ", "'"], [" n't", "n't"],
      [" 'm", "'m"], [" 's", "'s"], [" 've", "'ve"], [" 're", "'re"]];
    for (const [from, to] of [...tokenizersCleanup, ...transformersCleanup]) text = text.replaceAll(from, to);
    return text;
  }
}

function isControl(ch) {
  if (ch === '\t' || ch === '\n' || ch === '\r') return false;
  return /[\p{Cc}\p{Cf}]/u.test(ch);
}

function isCjk(c) {
  return (c >= 0x4e00 && c <= 0x9fff) || (c >= 0x3400 && c <= 0x4dbf) || (c >= 0x20000 && c <= 0x2a6df)
    || (c >= 0x2a700 && c <= 0x2b73f) || (c >= 0x2b740 && c <= 0x2b81f) || (c >= 0x2b820 && c <= 0x2ceaf)
    || (c >= 0xf900 && c <= 0xfaff) || (c >= 0x2f800 && c <= 0x2fa1f);
}

// ---------------------------------------------------------------------------------------------
// Decoding (plugins/blip/runtime/decoding.py), one image at a time

export class CachedDecoder {
  constructor(firstStep, withPast, layers) {
    this.firstStep = firstStep;
    this.withPast = withPast;
    this.present = [];
    this.past = [];
    this.cross = [];
    for (let i = 0; i < layers; i++) {
      for (const kv of ['key', 'value']) {
        this.present.push(`present.${i}.self_${kv}`);
        this.past.push(`past.${i}.self_${kv}`);
        this.cross.push(`cross.${i}.${kv}`);
      }
    }
    const expected = ['input_ids', ...this.past, ...this.cross];
    if (JSON.stringify(withPast.inputNames) !== JSON.stringify(expected)) {
      throw new BlipError(`the decoder graphs do not fit a ${layers}-layer BLIP decoder: with-past inputs are ${withPast.inputNames.slice(0, 6)}`);
    }
  }

  // Logits of the last prompt position (one row per image) and the cache.
  async start(prompt, imageEmbeds) {
    const ids = new ort.Tensor('int64', BigInt64Array.from(prompt, BigInt), [1, prompt.length]);
    const out = await this.firstStep.run({ input_ids: ids, image_embeds: imageEmbeds });
    const logits = lastPosition(requireFinite(out.logits, 'text_decoder', 'logits'));
    return { logits, cache: { self: this.present.map((n) => out[n]), cross: this.cross.map((n) => out[n]) } };
  }

  async advance(tokens, cache) {
    const feeds = { input_ids: new ort.Tensor('int64', BigInt64Array.from(tokens, BigInt), [tokens.length, 1]) };
    this.past.forEach((name, i) => { feeds[name] = cache.self[i]; });
    this.cross.forEach((name, i) => { feeds[name] = cache.cross[i]; });
    const out = await this.withPast.run(feeds);
    const logits = lastPosition(requireFinite(out.logits, 'text_decoder_with_past', 'logits'));
    return { logits, cache: { self: this.present.map((n) => out[n]), cross: cache.cross } };
  }
}

// [rows, positions, vocab] -> one Float32Array of the last position per row.
function lastPosition(tensor) {
  const [rows, positions, vocab] = tensor.dims;
  return Array.from({ length: rows }, (_, r) => tensor.data.slice((r * positions + positions - 1) * vocab, (r * positions + positions) * vocab));
}

// The cache rows `rows` (a beam reorder or a per-beam copy of one image's row).
function takeRows(tensor, rows) {
  const [n, ...rest] = tensor.dims;
  const size = rest.reduce((a, b) => a * b, 1);
  const out = new Float32Array(rows.length * size);
  rows.forEach((row, i) => out.set(tensor.data.subarray(row * size, (row + 1) * size), i * size));
  return new ort.Tensor('float32', out, [rows.length, ...rest]);
}

function takeCache(cache, rows) {
  return { self: cache.self.map((t) => takeRows(t, rows)), cross: cache.cross.map((t) => takeRows(t, rows)) };
}

// generate's logits processors in float32: repetition penalty over the sequence so far (prompt
// included), then min_tokens (eos ruled out).
function processScores(scores, sequence, generated, options, eos) {
  const out = Float32Array.from(scores);
  if (options.repetitionPenalty !== 1.0) {
    const penalty = Math.fround(options.repetitionPenalty);
    for (const id of new Set(sequence)) {
      if (id < 0 || id >= out.length) continue;
      out[id] = out[id] < 0 ? Math.fround(out[id] * penalty) : Math.fround(out[id] / penalty);
    }
  }
  if (generated < options.minTokens) out[eos] = -Infinity;
  return out;
}

function logSoftmax(logits) {
  let max = -Infinity;
  for (const v of logits) if (v > max) max = v;
  const shifted = new Float32Array(logits.length);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) {
    shifted[i] = Math.fround(logits[i] - max);
    sum += Math.fround(Math.exp(shifted[i]));
  }
  const logSum = Math.fround(Math.log(Math.fround(sum)));
  for (let i = 0; i < shifted.length; i++) shifted[i] = Math.fround(shifted[i] - logSum);
  return shifted;
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

// Indices of the k largest, largest first; equal scores in index order.
function top(values, k) {
  const indices = Array.from(values.keys());
  indices.sort((a, b) => (values[b] - values[a]) || (a - b));
  return indices.slice(0, k);
}

// The search alone, for any decoder with `start(prompt, embeds)` and `advance(tokens, cache)` (tests
// drive it with a decoder whose logits both languages can compute exactly).
export async function search(decoder, embeds, prompt, options, eos, pad) {
  checkOptions(options);
  return options.beams === 1 ? greedy(decoder, embeds, prompt, options, eos, pad) : beamSearch(decoder, embeds, prompt, options, eos);
}

async function greedy(decoder, embeds, prompt, options, eos, pad) {
  const sequence = [...prompt];
  let { logits, cache } = await decoder.start(prompt, embeds);
  let logProb = 0;
  let generated = 0;
  const tokens = [];
  for (;;) {
    const scores = processScores(logits[0], sequence, generated, options, eos);
    const token = argmax(scores);
    logProb += logSoftmax(scores)[token];
    sequence.push(token);
    tokens.push(token);
    generated += 1;
    if (generated >= options.maxTokens || token === eos) break;
    ({ logits, cache } = await decoder.advance([token], cache));
  }
  return { token_ids: tokens, score: logProb / tokens.length ** options.lengthPenalty };
}

async function beamSearch(decoder, embeds, prompt, options, eos) {
  const beams = options.beams;
  const candidates = 2 * beams;
  const promptLen = prompt.length, maxLen = promptLen + options.maxTokens;
  let { logits, cache } = await decoder.start(prompt, embeds);
  logits = Array.from({ length: beams }, () => logits[0]);
  cache = takeCache(cache, new Array(beams).fill(0));
  let running = Array.from({ length: beams }, () => [...prompt]);
  let runningScores = Array.from({ length: beams }, (_, b) => (b === 0 ? 0 : NEG));
  let finished = [];  // {seq, score, len}, at most `beams`, best first
  let canImprove = true;
  let curLen = promptLen;
  for (;;) {
    const generated = curLen - promptLen;
    const totals = [];
    let vocab = 0;
    for (let b = 0; b < beams; b++) {
      const scores = processScores(logSoftmax(logits[b]), running[b], generated, options, eos);
      vocab = scores.length;
      for (let v = 0; v < vocab; v++) totals.push(Math.fround(scores[v] + runningScores[b]));
    }
    const best = top(totals, candidates).map((flat) => ({
      score: totals[flat], beam: Math.floor(flat / vocab), token: flat % vocab,
    }));
    for (const c of best) c.stops = c.token === eos || curLen + 1 >= maxLen;
    // The best `beams` continuations that go on (a stopping one is pushed down by NEG, as generate does).
    const open = best.map((c) => Math.fround(c.score + (c.stops ? NEG : 0)));
    const keep = top(open, beams);
    const sourceRows = keep.map((i) => best[i].beam);
    const nextRunning = keep.map((i) => [...running[best[i].beam], best[i].token]);
    runningScores = keep.map((i) => open[i]);
    // Finished hypotheses: only among the first `beams` candidates, scored per generated token.
    const lengthScale = Math.fround((generated + 1) ** options.lengthPenalty);
    const merged = [...finished];
    best.forEach((c, rank) => {
      let score = Math.fround(c.score / lengthScale);
      if (!canImprove) score = Math.fround(score + NEG);
      if (!(c.stops && rank < beams)) score = Math.fround(score + NEG);
      merged.push({ seq: [...running[c.beam], c.token], score, len: generated + 1, finished: c.stops && rank < beams });
    });
    const order = top(merged.map((h) => h.score), beams);
    finished = order.map((i) => merged[i]);
    running = nextRunning;
    curLen += 1;
    const bestPossible = Math.fround(runningScores[0] / Math.fround((curLen - promptLen) ** options.lengthPenalty));
    const worstKept = finished.length ? Math.min(...finished.map((h) => h.score)) : NEG;
    // generate's early_stopping=False heuristic, over the `beams` kept slots (unfilled ones hold NEG).
    const slotsWorst = finished.every((h) => h.finished) ? worstKept : NEG;
    canImprove = canImprove && bestPossible > slotsWorst;
    if (!canImprove || best.every((c) => c.stops)) break;
    // One image: every row's cross-attention keys and values are the same, only the self cache follows the beams.
    const reordered = { self: cache.self.map((t) => takeRows(t, sourceRows)), cross: cache.cross };
    ({ logits, cache } = await decoder.advance(running.map((s) => s[curLen - 1]), reordered));
  }
  const winner = finished[0];
  return { token_ids: winner.seq.slice(promptLen, promptLen + winner.len), score: winner.score };
}

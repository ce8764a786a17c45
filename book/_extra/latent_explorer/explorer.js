// The latent explorer of the hands-on VAE book: the chapters' trained VAEs, run in the
// browser. Plain JavaScript, no library: each network is three linear layers with ReLU
// between them, a few small matrix-vector products per image.
//
// The weights come from weights.js (window.LATENT_EXPLORER), written by
// vae_helpers.export_explorer_weights in notebooks/08_latent_explorer.ipynb. Every float
// array there is base64 of little-endian float32 values; images and labels are uint8.
// window.latentExplorer gives the browser test (tests/test_website.py) the same
// functions the page uses.
"use strict";

(function () {
  const SIZE = 28;
  const PIXELS = SIZE * SIZE;
  const MAP_RANGE = 4; // the map and the z sliders show -4..4 on both axes
  const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]; // matplotlib's tab10
  const $ = (id) => document.getElementById(id);

  function bytesOf(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }
  const floatsOf = (text) => new Float32Array(bytesOf(text).buffer);

  // ---------------------------------------------------------------------------------
  // The networks: y = W x + b (W stored row by row, as PyTorch's nn.Linear does)
  // ---------------------------------------------------------------------------------

  function network(tensors, prefix) {
    const indices = Object.keys(tensors)
      .map((key) => key.match(new RegExp("^" + prefix + "\\.(\\d+)\\.weight$")))
      .filter(Boolean).map((match) => Number(match[1])).sort((a, b) => a - b);
    return indices.map((i) => {
      const weight = tensors[`${prefix}.${i}.weight`];
      return { out: weight.shape[0], in: weight.shape[1], weight: floatsOf(weight.data),
        bias: floatsOf(tensors[`${prefix}.${i}.bias`].data) };
    });
  }

  function forward(layers, input) {
    let x = input;
    layers.forEach((layer, n) => {
      const y = new Float64Array(layer.out);
      for (let o = 0; o < layer.out; o++) {
        let sum = layer.bias[o];
        const row = o * layer.in;
        for (let i = 0; i < layer.in; i++) sum += layer.weight[row + i] * x[i];
        y[o] = n < layers.length - 1 ? Math.max(sum, 0) : sum; // ReLU between layers
      }
      x = y;
    });
    return x;
  }

  function model(exported) {
    const tensors = exported.tensors;
    const encoder = network(tensors, "encoder");
    const decoder = network(tensors, "decoder");
    const latentDim = decoder[0].in;
    return {
      latentDim,
      decode: (z) => forward(decoder, z), // normalized pixels, 784
      encode: (x) => Array.from(forward(encoder, x).slice(0, latentDim)), // mu(x)
    };
  }

  // ---------------------------------------------------------------------------------
  // Images: normalized pixels <-> 8-bit grey levels, and drawing them enlarged
  // ---------------------------------------------------------------------------------

  let MEAN = 0, STD = 1;
  const toGrey = (x) => Math.round(Math.min(Math.max(x * STD + MEAN, 0), 1) * 255);
  const normalized = (grey) => Float64Array.from(grey, (g) => (g / 255 - MEAN) / STD);

  function paint(canvas, greys) {
    // each of the 28 x 28 grey levels becomes a block of (width / 28)^2 canvas pixels
    const scale = canvas.width / SIZE;
    const context = canvas.getContext("2d");
    const image = context.createImageData(canvas.width, canvas.height);
    for (let y = 0; y < canvas.height; y++) {
      for (let x = 0; x < canvas.width; x++) {
        const grey = greys[Math.floor(y / scale) * SIZE + Math.floor(x / scale)];
        const at = 4 * (y * canvas.width + x);
        image.data[at] = image.data[at + 1] = image.data[at + 2] = grey;
        image.data[at + 3] = 255;
      }
    }
    context.putImageData(image, 0, 0);
  }
  const paintDecoded = (canvas, x) => paint(canvas, Array.from(x, toGrey));

  // ---------------------------------------------------------------------------------
  // The page
  // ---------------------------------------------------------------------------------

  function start(data) {
    [MEAN, STD] = data.normalize;
    const m32 = model(data.latent32);
    const m2 = model(data.latent2);
    const mapCodes = floatsOf(data.map.codes);
    const mapLabels = bytesOf(data.map.labels);
    const digitImages = bytesOf(data.digits.images);
    const digits = data.digits.labels.map((label, k) => {
      const grey = digitImages.slice(k * PIXELS, (k + 1) * PIXELS);
      return { label, index: data.digits.index[k], grey, mu: m32.encode(normalized(grey)) };
    });
    const pcDirections = floatsOf(data.principal.directions);
    const state = { z2: [0, 0], drawnMu2: null, drawnMu32: null, drawnGrey: null };

    // --- the 2-D map -----------------------------------------------------------------
    const background = document.createElement("canvas");
    function renderBackground(width) {
      background.width = background.height = width;
      const context = background.getContext("2d");
      context.fillStyle = "#fff";
      context.fillRect(0, 0, width, width);
      context.strokeStyle = "#ccc";
      context.fillStyle = "#666";
      context.font = "11px sans-serif";
      for (let tick = -MAP_RANGE; tick <= MAP_RANGE; tick += 2) {
        const [x, y] = toMap(width, [tick, tick]);
        context.beginPath();
        context.moveTo(x, 0); context.lineTo(x, width);
        context.moveTo(0, y); context.lineTo(width, y);
        context.stroke();
        context.fillText(String(tick), x + 2, width - 3);
        if (tick !== -MAP_RANGE) context.fillText(String(tick), 2, y - 2);
      }
      context.globalAlpha = 0.55;
      for (let i = 0; i < mapLabels.length; i++) {
        const [x, y] = toMap(width, [mapCodes[2 * i], mapCodes[2 * i + 1]]);
        context.fillStyle = COLOURS[mapLabels[i]];
        context.fillRect(x - 1, y - 1, 2, 2);
      }
      context.globalAlpha = 1;
    }
    function toMap(width, z) {
      const unit = width / (2 * MAP_RANGE);
      return [(z[0] + MAP_RANGE) * unit, (MAP_RANGE - z[1]) * unit];
    }
    function fromMap(canvas, event) {
      const box = canvas.getBoundingClientRect();
      const x = (event.clientX - box.left) / box.width;
      const y = (event.clientY - box.top) / box.height;
      const clip = (v) => Math.min(Math.max(v, -MAP_RANGE), MAP_RANGE);
      return [clip((2 * x - 1) * MAP_RANGE), clip((1 - 2 * y) * MAP_RANGE)];
    }
    function marker(context, width, z, colour, cross) {
      const [x, y] = toMap(width, z);
      // drawn twice, wide and white under narrow and dark, to stand out on any dots
      [["#fff", 5], [colour, 2.5]].forEach(([style, lineWidth]) => {
        context.strokeStyle = style;
        context.lineWidth = lineWidth;
        context.beginPath();
        if (cross) {
          context.moveTo(x - 9, y); context.lineTo(x + 9, y);
          context.moveTo(x, y - 9); context.lineTo(x, y + 9);
        } else {
          context.arc(x, y, 8, 0, 2 * Math.PI);
        }
        context.stroke();
      });
      context.lineWidth = 1;
    }
    function renderMap(canvas, showCross) {
      if (background.width !== canvas.width) renderBackground(canvas.width);
      const context = canvas.getContext("2d");
      context.drawImage(background, 0, 0);
      if (showCross) marker(context, canvas.width, state.z2, "#000", true);
      if (state.drawnMu2) marker(context, canvas.width, state.drawnMu2, "#000", false);
    }

    const map = $("le-map");
    const mapImage = $("le-map-image");
    const sliderZ = [$("le-z1"), $("le-z2")];
    function show2d(z, fromSlider) {
      state.z2 = [Number(z[0]), Number(z[1])];
      if (!fromSlider) sliderZ.forEach((slider, d) => { slider.value = state.z2[d].toFixed(2); });
      sliderZ.forEach((slider, d) => { $(slider.id + "-value").textContent = state.z2[d].toFixed(2); });
      renderMap(map, true);
      paintDecoded(mapImage, m2.decode(state.z2));
    }
    let dragging = false;
    map.addEventListener("pointerdown", (event) => {
      dragging = true;
      map.setPointerCapture(event.pointerId);
      show2d(fromMap(map, event));
      event.preventDefault();
    });
    map.addEventListener("pointermove", (event) => { if (dragging) show2d(fromMap(map, event)); });
    const stopDragging = () => { dragging = false; };
    map.addEventListener("pointerup", stopDragging);
    map.addEventListener("pointercancel", stopDragging);
    sliderZ.forEach((slider) => slider.addEventListener("input",
      () => show2d(sliderZ.map((s) => Number(s.value)), true)));
    $("le-legend").replaceChildren(...COLOURS.map((colour, digit) => {
      const item = document.createElement("span");
      item.className = "le-legend-item";
      item.innerHTML = `<span class="le-swatch" style="background:${colour}"></span>${digit}`;
      return item;
    }));

    // --- the 32-D model: principal directions ----------------------------------------
    function fillDigitMenu(select, chosen) {
      select.replaceChildren(...digits.map((digit, k) => {
        const option = document.createElement("option");
        option.value = String(k);
        option.textContent = `a ${digit.label} (test image ${digit.index})`;
        return option;
      }));
      select.value = String(digits.findIndex((digit) => digit.label === chosen));
    }
    const startMenu = $("le-start");
    fillDigitMenu(startMenu, 2);
    const pcImage = $("le-pc-image");
    const pcSliders = data.principal.std.map((std, k) => {
      const row = document.createElement("div");
      row.className = "le-slider";
      const percent = (100 * data.principal.explained[k]).toFixed(1);
      row.innerHTML = `<label for="le-pc${k + 1}" title="standard deviation of the codes` +
        ` along it: ${std.toFixed(2)}">direction ${k + 1} <small>${percent}%</small></label>` +
        `<input type="range" id="le-pc${k + 1}" min="-3" max="3" step="0.05" value="0">` +
        `<output id="le-pc${k + 1}-value" for="le-pc${k + 1}">0.00 sd</output>`;
      $("le-pc-sliders").appendChild(row);
      return row.querySelector("input");
    });
    function codeFromSliders() {
      const z = Float64Array.from(digits[Number(startMenu.value)].mu);
      pcSliders.forEach((slider, k) => {
        const step = Number(slider.value) * data.principal.std[k];
        for (let d = 0; d < m32.latentDim; d++) z[d] += step * pcDirections[k * m32.latentDim + d];
        $(slider.id + "-value").textContent = `${Number(slider.value).toFixed(2)} sd`;
      });
      return z;
    }
    function show32(z) {
      state.z32 = Array.from(z);
      paintDecoded(pcImage, m32.decode(z));
    }
    function updatePrincipal() {
      paint($("le-pc-original"), digits[Number(startMenu.value)].grey);
      show32(codeFromSliders());
    }
    pcSliders.forEach((slider) => slider.addEventListener("input", updatePrincipal));
    startMenu.addEventListener("change", updatePrincipal);
    $("le-pc-reset").addEventListener("click", () => {
      pcSliders.forEach((slider) => { slider.value = "0"; });
      updatePrincipal();
    });

    // --- the 32-D model: interpolation -----------------------------------------------
    const fromMenu = $("le-from"), toMenu = $("le-to"), mix = $("le-t");
    fillDigitMenu(fromMenu, 4);
    fillDigitMenu(toMenu, 9);
    function updateInterpolation() {
      const a = digits[Number(fromMenu.value)], b = digits[Number(toMenu.value)];
      const t = Number(mix.value);
      paint($("le-from-image"), a.grey);
      paint($("le-to-image"), b.grey);
      paintDecoded($("le-mix-image"), m32.decode(a.mu.map((v, d) => (1 - t) * v + t * b.mu[d])));
      $("le-t-value").textContent = t.toFixed(2);
    }
    [fromMenu, toMenu].forEach((menu) => menu.addEventListener("change", updateInterpolation));
    mix.addEventListener("input", updateInterpolation);

    // --- draw a digit ----------------------------------------------------------------
    const pad = $("le-draw");
    const pen = pad.getContext("2d");
    function clearPad() {
      pen.fillStyle = "#000";
      pen.fillRect(0, 0, pad.width, pad.height);
    }
    clearPad();
    let last = null;
    function padPoint(event) {
      const box = pad.getBoundingClientRect();
      return [(event.clientX - box.left) * pad.width / box.width,
        (event.clientY - box.top) * pad.height / box.height];
    }
    function stroke(to) {
      pen.strokeStyle = pen.fillStyle = "#fff";
      pen.lineWidth = pad.width / 12;
      pen.lineCap = pen.lineJoin = "round";
      pen.beginPath();
      pen.moveTo(...(last || to));
      pen.lineTo(...to);
      pen.stroke();
      last = to;
    }
    let pending = false;
    function encodeSoon() {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => { pending = false; encodeDrawing(); });
    }
    pad.addEventListener("pointerdown", (event) => {
      pad.setPointerCapture(event.pointerId);
      last = null;
      stroke(padPoint(event));
      encodeSoon();
      event.preventDefault();
    });
    pad.addEventListener("pointermove", (event) => {
      if (last) { stroke(padPoint(event)); encodeSoon(); }
    });
    const penUp = () => { last = null; encodeDrawing(); };
    pad.addEventListener("pointerup", penUp);
    pad.addEventListener("pointercancel", penUp);
    $("le-clear").addEventListener("click", () => {
      clearPad();
      state.drawnMu2 = state.drawnMu32 = state.drawnGrey = null;
      [$("le-input"), $("le-recon32")].forEach((canvas) => paint(canvas, new Uint8Array(PIXELS)));
      $("le-mu2").textContent = "draw a digit";
      renderMap(map, true);
      renderMap($("le-draw-map"), false);
    });

    function mnistLike() {
      // As MNIST was made: the ink's bounding box scaled to fit 20 x 20 pixels (box
      // filter), then shifted so that its centre of mass is the centre of the 28 x 28.
      const { width, height } = pad;
      const ink = pen.getImageData(0, 0, width, height).data;
      let left = width, right = -1, top = height, bottom = -1;
      for (let y = 0; y < height; y++) {
        for (let x = 0; x < width; x++) {
          if (ink[4 * (y * width + x)] > 0) {
            left = Math.min(left, x); right = Math.max(right, x);
            top = Math.min(top, y); bottom = Math.max(bottom, y);
          }
        }
      }
      if (right < 0) return null;
      const scale = 20 / Math.max(right - left + 1, bottom - top + 1);
      const box = new Float64Array(PIXELS);
      const offsetX = (SIZE - (right - left + 1) * scale) / 2;
      const offsetY = (SIZE - (bottom - top + 1) * scale) / 2;
      for (let y = top; y <= bottom; y++) {
        for (let x = left; x <= right; x++) {
          const tx = Math.floor(offsetX + (x - left + 0.5) * scale);
          const ty = Math.floor(offsetY + (y - top + 0.5) * scale);
          box[ty * SIZE + tx] += (ink[4 * (y * width + x)] / 255) * scale * scale;
        }
      }
      let mass = 0, cx = 0, cy = 0;
      box.forEach((v, i) => { mass += v; cx += v * (i % SIZE); cy += v * Math.floor(i / SIZE); });
      const dx = Math.round(13.5 - cx / mass), dy = Math.round(13.5 - cy / mass);
      const grey = new Uint8Array(PIXELS);
      for (let y = 0; y < SIZE; y++) {
        for (let x = 0; x < SIZE; x++) {
          const sx = x - dx, sy = y - dy;
          if (sx >= 0 && sx < SIZE && sy >= 0 && sy < SIZE) {
            grey[y * SIZE + x] = Math.round(Math.min(box[sy * SIZE + sx], 1) * 255);
          }
        }
      }
      return grey;
    }
    function encodeDrawing() {
      const grey = mnistLike();
      if (!grey) return;
      const x = normalized(grey);
      state.drawnGrey = grey;
      state.drawnMu32 = m32.encode(x);
      state.drawnMu2 = m2.encode(x);
      paint($("le-input"), grey);
      paintDecoded($("le-recon32"), m32.decode(state.drawnMu32));
      $("le-mu2").textContent =
        `μ(x) = (${state.drawnMu2.map((v) => v.toFixed(2)).join(", ")})`;
      renderMap(map, true);
      renderMap($("le-draw-map"), false);
    }

    // --- first view ------------------------------------------------------------------
    [$("le-input"), $("le-recon32")].forEach((canvas) => paint(canvas, new Uint8Array(PIXELS)));
    renderMap($("le-draw-map"), false);
    show2d([0, 0]);
    updatePrincipal();
    updateInterpolation();
    $("le-status").textContent = "";
    $("le-status").hidden = true;
    $("latent-explorer").classList.add("le-ready");

    window.latentExplorer = {
      state, digits, show2d, show32, toGrey,
      decode2: (z) => Array.from(m2.decode(z)),
      decode32: (z) => Array.from(m32.decode(z)),
      encode2: (grey) => m2.encode(normalized(grey)),
      encode32: (grey) => m32.encode(normalized(grey)),
    };
  }

  function init() {
    const status = $("le-status");
    if (!status) return;
    if (!window.LATENT_EXPLORER) {
      status.textContent = "The explorer's weights are missing: execute " +
        "notebooks/08_latent_explorer.ipynb (it exports them), then rebuild the book.";
      return;
    }
    start(window.LATENT_EXPLORER);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();

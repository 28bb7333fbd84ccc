/* zfserve explorer: the page's logic. Plain ES2020, no framework, no build step; it talks only to this
 * server's /api/v1 routes (the contract is in the server's explorer_api module) and never blocks: every call
 * is a fetch, a sweep is read as a stream and can be cancelled, and a newer request replaces an older one.
 *
 * Element ids (stable: tests/test_explorer_page.py drives the page by them)
 *   error, error-text, error-close        the visible error line (the server's message, verbatim)
 *   token-form, token-input, token-submit, token-message
 *                                          shown when the server answers 401; the token stays in sessionStorage
 *   model-select, model-name, model-version, index-status
 *   drop-zone, file-input, image-status   upload by drag-and-drop or the file input
 *   examples                              bundled examples: button.example[data-name]
 *   image-canvas, heatmap, box-overlay    the network's 224x224 view; the occlusion map over it; unit boxes
 *   predictions, predictions-status       top-5: li.prediction[data-index] > .name, .probability
 *   ood-notice, ood-text, ood-status      the out-of-distribution notice above the predictions (shown when the
 *                                         image scores above the model's threshold); the score, or why none
 *   model-data                            what the model was trained on (its provenance, in words)
 *   occlusion-label, window, stride, target, map-kind, heatmap-opacity, run-sweep, cancel-sweep,
 *   sweep-progress, sweep-status, heatmap-legend, occlusion-summary
 *                                          sweep-status reads "running", "done", "cancelled" or "failed"
 *   deconv-label, layer-tabs (button#tab-<layer>, one per conv layer of the model, by its own names:
 *   conv1..conv5, conv1_1..conv5_3, ...), deconv-status,
 *   units                                 button.unit[data-channel] > canvas.projection, img.patch, .caption
 *                                         (a model without known layers, an ONNX model: no tabs, no units, and
 *                                         deconv-status says why in one line)
 *   unit-detail, unit-title, unit-data, unit-message, unit-top9 (figure > img.top9-patch)
 *
 * The URL's hash is the view, so a link restores it while the server still holds the image:
 *   #image=<sha256>&model=<name>&layer=conv3&unit=12&window=32&stride=8&target=3&map=attribution&occlusion=1
 */
"use strict";

(() => {
  const API = "api/v1";
  const TOKEN_KEY = "zfserve-explorer-token";
  const TOP_K = 5;
  const UNITS_PER_LAYER = 9;
  // The colour anchors of zfserve.render (viridis-like; blue-white-red), linearly interpolated.
  const SEQUENTIAL = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const DIVERGING = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
  const DROP = DIVERGING.slice(2);   // white (no effect) to red (the largest drop)

  const $ = (id) => document.getElementById(id);

  // What the URL holds.
  const view = {image: null, model: null, layer: null, unit: null, window: 32, stride: 8, target: null,
                map: "probability", occlusion: false};
  // What the page holds besides.
  const app = {models: new Map(), defaultModel: null, picture: null, units: [], sweepResult: null,
               requests: {}, sweep: null, token: null};

  // ------------------------------------------------------------------------------------------ API
  class ApiError extends Error {
    constructor(status, message, field) {
      super(message);
      this.name = "ApiError";
      this.status = status;
      this.field = field || "";
    }
  }

  let tokenWait = null;

  function askForToken(message) {
    if (!tokenWait) {
      let release;
      const promise = new Promise((resolve) => { release = resolve; });
      tokenWait = {promise, release};
      $("token-form").hidden = false;
      $("token-message").textContent = message;
      $("token-input").value = "";
      $("token-input").focus();
    }
    return tokenWait.promise;
  }

  function submitToken(event) {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) {
      $("token-message").textContent = "token: empty; paste the server's token";
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token-form").hidden = true;
    const waiting = tokenWait;
    tokenWait = null;
    if (waiting) waiting.release();
  }

  async function errorOf(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") return new ApiError(response.status, body.error, body.field);
    } catch (ignored) { /* not JSON: use the status line */ }
    return new ApiError(response.status, `server: HTTP ${response.status} ${response.statusText}`.trim(), "");
  }

  // fetch with the token, JSON bodies and errors as ApiError; a 401 asks for the token and tries again.
  async function api(path, {method = "GET", json, body, signal, raw = false} = {}) {
    for (;;) {
      const headers = {};
      const token = sessionStorage.getItem(TOKEN_KEY);
      if (token) headers.Authorization = `Bearer ${token}`;
      let payload = body;
      if (json !== undefined) {
        headers["Content-Type"] = "application/json";
        payload = JSON.stringify(json);
      }
      let response;
      try {
        response = await fetch(`${API}/${path}`, {method, headers, body: payload, signal});
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw new ApiError(0, "server: unreachable (is `zfserve serve --http-port` still running?)", "server");
      }
      if (response.status === 401) {
        const refused = token ? "That token was refused; try again." : "";
        await askForToken(refused);
        continue;
      }
      if (!response.ok) throw await errorOf(response);
      return raw ? response : response.json();
    }
  }

  // One request of each kind at a time: a newer one aborts the older, whose answer is then ignored.
  function begin(kind) {
    if (app.requests[kind]) app.requests[kind].abort();
    const controller = new AbortController();
    app.requests[kind] = controller;
    return controller;
  }

  function finish(kind, controller) {
    if (app.requests[kind] === controller) delete app.requests[kind];
  }

  function showError(err) {
    if (!err || err.name === "AbortError") return;
    $("error-text").textContent = err.message || String(err);
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  // ------------------------------------------------------------------------------------------ URL
  function readHash() {
    const p = new URLSearchParams(location.hash.replace(/^#/, ""));
    const integer = (key) => (p.has(key) && /^\d+$/.test(p.get(key)) ? Number(p.get(key)) : null);
    return {
      image: p.get("image") || null,
      model: p.get("model") || null,
      layer: p.get("layer") || null,   // checked against the model's layers once the model is known
      unit: integer("unit"),
      window: integer("window") ?? 32,
      stride: integer("stride") ?? 8,
      target: integer("target"),
      map: p.get("map") === "attribution" ? "attribution" : "probability",
      occlusion: p.get("occlusion") === "1",
    };
  }

  function writeHash(push = false) {
    const p = new URLSearchParams();
    if (view.image) p.set("image", view.image);
    if (view.model) p.set("model", view.model);
    if (view.layer) p.set("layer", view.layer);
    if (view.unit !== null) p.set("unit", String(view.unit));
    p.set("window", String(view.window));
    p.set("stride", String(view.stride));
    if (view.target !== null) p.set("target", String(view.target));
    if (view.map !== "probability") p.set("map", view.map);
    if (view.occlusion) p.set("occlusion", "1");
    const hash = `#${p.toString()}`;
    if (hash === location.hash) return;
    history[push ? "pushState" : "replaceState"](null, "", hash);
  }

  // ------------------------------------------------------------------------------------------ models
  function currentModel() {
    return app.models.get(view.model) || null;
  }

  async function loadModels() {
    const listing = await api("models");
    app.defaultModel = listing.default;
    app.models = new Map(listing.models.map((m) => [m.name, m]));
    const select = $("model-select");
    select.replaceChildren(...listing.models.map((m) => {
      const option = new Option(m.ready ? m.name : `${m.name} (not ready)`, m.name);
      option.disabled = !m.ready;
      if (!m.ready) option.title = m.reason;
      return option;
    }));
    const wanted = app.models.get(view.model);
    if (!wanted || !wanted.ready) {
      const ready = listing.models.find((m) => m.ready);
      view.model = (app.models.get(listing.default) || {}).ready ? listing.default : (ready ? ready.name : null);
    }
    select.value = view.model || "";
    showModel();
  }

  // The model's conv layers (the tabs), by its own names; a layer the model lacks falls back to its first.
  function modelLayers() {
    const model = currentModel();
    return (model && model.conv_layers) || [];
  }

  function fitLayer(layer) {
    const layers = modelLayers();
    return layers.includes(layer) ? layer : (layers[0] || null);
  }

  function showModel() {
    const model = currentModel();
    view.layer = fitLayer(view.layer);
    buildTabs();
    $("model-name").textContent = model ? model.name : "no model is ready";
    $("model-version").textContent = model ? `version ${model.version}` : "";
    const index = model && model.index;
    $("index-status").textContent = !model ? "" : index
      ? `unit index: ${index.data}`
      : `no unit index (zfserve index --model ${model.name})`;
    $("model-data").textContent = model && model.training_data
      ? `${model.name} was trained on ${model.training_data}.` : "";
    const labels = (model && model.labels) || {};
    $("occlusion-label").textContent = labels.occlusion ? `Map: ${labels.occlusion}.` : "";
    $("deconv-label").textContent = labels.deconv ? `Projections: ${labels.deconv}.` : "";
    const target = $("target");
    const names = (model && model.class_names) || [];
    target.replaceChildren(new Option("top-1 prediction", ""),
      ...names.map((name, i) => new Option(`${i}: ${name}`, String(i))));
    target.value = view.target !== null && view.target < names.length ? String(view.target) : "";
  }

  function setVersion(version) {
    if (version) $("model-version").textContent = `version ${version}`;
  }

  // ------------------------------------------------------------------------------------------ examples
  async function loadExamples() {
    try {
      const examples = await api("examples");
      $("examples").replaceChildren(...examples.map((example) => {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "example";
        button.dataset.name = example.name;
        button.dataset.id = example.id;
        button.title = example.name;
        const img = document.createElement("img");
        img.alt = example.name;
        img.src = `explorer/examples/${encodeURIComponent(example.name)}.jpg`;
        button.append(img);
        button.addEventListener("click", () => {
          clearError();
          setImageStatus(`example: ${example.name}`);
          chooseImage(example.id);
        });
        return button;
      }));
    } catch (err) {
      showError(err);
    }
  }

  function markExample() {
    for (const button of $("examples").querySelectorAll(".example")) {
      button.classList.toggle("selected", button.dataset.id === view.image);
    }
  }

  // ------------------------------------------------------------------------------------------ image
  function setImageStatus(text) {
    $("image-status").textContent = text;
  }

  async function uploadFile(file) {
    if (!file) return;
    clearError();
    setImageStatus(`uploading ${file.name}…`);
    try {
      const info = await api("images", {method: "POST", body: file});
      setImageStatus(`${file.name}: ${info.format} ${info.width}×${info.height}`);
      await chooseImage(info.id);
    } catch (err) {
      setImageStatus("");
      showError(err);
    }
  }

  // A new image from the user: analyses from scratch, the sweep after the projections (they share the
  // server's heavy worker, so the layer view comes first).
  async function chooseImage(id) {
    view.image = id;
    view.unit = null;
    view.occlusion = false;
    writeHash(true);
    await showImage({sweep: true});
  }

  async function showImage({sweep}) {
    stopSweep();
    clearHeatmap();
    markExample();
    hideUnit();
    $("drop-zone").classList.remove("needs-file");
    if (!view.image) return;
    const controller = begin("picture");
    let blob;
    try {
      blob = await (await api(`images/${view.image}`, {raw: true, signal: controller.signal})).blob();
    } catch (err) {
      finish("picture", controller);
      if (err.name === "AbortError") return;
      forgetImage(err);
      return;
    }
    try {
      app.picture = await createImageBitmap(blob);
    } catch (err) {
      // The browser cannot draw it (a truncated or odd file): the server's decoder has the last word, so its
      // answer (the error gRPC gives for the same bytes, or predictions) is what the page shows.
      app.picture = null;
      drawPicture();
      await classify();
      if ($("error").hidden) showError(new Error("image: the browser cannot display this file; the predictions "
        + "are the server's"));
      return;
    } finally {
      finish("picture", controller);
    }
    drawPicture();
    classify();
    const units = loadUnits();
    if (view.unit !== null) showUnit(view.unit);
    if (sweep) units.finally(() => { if (!app.sweep && !app.sweepResult) runSweep(); });
  }

  // The server no longer has the image (or never had it): say so and ask for the file again.
  function forgetImage(err) {
    showError(err);
    view.image = null;
    view.occlusion = false;
    writeHash();
    app.picture = null;
    drawPicture();
    showOod({});
    $("predictions").replaceChildren();
    $("units").replaceChildren();
    setImageStatus(err.status === 404 ? "The server no longer has this image: upload the file again." : "");
    $("drop-zone").classList.add("needs-file");
    if (view.unit !== null) showUnit(view.unit);
  }

  function cropSize() {
    const model = currentModel() || {};
    const crop = model.input_size || 224;
    const resize = (model.preprocess && model.preprocess.resize) || Math.round((crop * 256) / 224);
    return {crop, resize};
  }

  // The network's view: the short side resized, the centre crop (zfserve.preprocess.resize_and_crop).
  function drawPicture() {
    const canvas = $("image-canvas");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    $("drop-hint").hidden = Boolean(app.picture);
    if (!app.picture) return;
    const {crop, resize} = cropSize();
    const {width, height} = app.picture;
    const side = (Math.min(width, height) * crop) / resize;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(app.picture, (width - side) / 2, (height - side) / 2, side, side, 0, 0, canvas.width,
      canvas.height);
  }

  // ------------------------------------------------------------------------------------------ classify
  async function classify() {
    const controller = begin("classify");
    showOod({});
    $("predictions-status").textContent = "classifying…";
    try {
      const result = await api("classify", {method: "POST", signal: controller.signal,
        json: {image: view.image, model: view.model, top_k: TOP_K}});
      setVersion(result.version);
      showOod(result);
      $("predictions").replaceChildren(...result.predictions.map(predictionRow));
      $("predictions-status").textContent = `${result.model} ${result.version}`;
    } catch (err) {
      if (err.name === "AbortError") return;
      $("predictions-status").textContent = "";
      showError(err);
    } finally {
      finish("classify", controller);
    }
  }

  // The notice above the predictions: shown when the image lies outside what the model was fitted on.
  function showOod(result) {
    const ood = result.ood;
    const outside = Boolean(ood && ood.out_of_distribution);
    $("ood-notice").hidden = !outside;
    const model = currentModel();
    const knows = model && model.training_data ? ` ${result.model} knows ${model.training_data}.` : "";
    $("ood-text").textContent = outside
      ? `This image is unlike anything ${result.model} was fitted on (out-of-distribution score ` +
        `${ood.score.toFixed(2)} > threshold ${ood.threshold.toFixed(2)}), so the predictions below mean little.` +
        knows
      : "";
    $("ood-status").textContent = !ood ? (result.ood_note || "")
      : outside ? "" : `Out-of-distribution score ${ood.score.toFixed(2)} (threshold ${ood.threshold.toFixed(2)}): ` +
        "like the images this model knows.";
  }

  function predictionRow(prediction) {
    const li = document.createElement("li");
    li.className = "prediction";
    li.dataset.index = String(prediction.index);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = prediction.name;
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${(100 * prediction.probability).toFixed(1)}%`;
    fill.style.display = "block";
    track.append(fill);
    const probability = document.createElement("span");
    probability.className = "probability";
    probability.textContent = `${(100 * prediction.probability).toFixed(1)}%`;
    li.append(name, track, probability);
    return li;
  }

  // ------------------------------------------------------------------------------------------ layers
  function buildTabs() {
    $("layer-tabs").replaceChildren(...modelLayers().map((layer) => {
      const tab = document.createElement("button");
      tab.type = "button";
      tab.className = "tab";
      tab.id = `tab-${layer}`;
      tab.setAttribute("role", "tab");
      tab.textContent = layer;
      tab.addEventListener("click", () => chooseLayer(layer));
      return tab;
    }));
  }

  function markTab() {
    for (const layer of modelLayers()) {
      $(`tab-${layer}`).setAttribute("aria-selected", String(layer === view.layer));
    }
  }

  function chooseLayer(layer) {
    if (layer === view.layer) return;
    view.layer = layer;
    view.unit = null;
    writeHash(true);
    markTab();
    hideUnit();
    if (view.image) loadUnits();
  }

  async function loadUnits() {
    markTab();
    const note = (currentModel() || {}).layers_note;
    if (note) {   // the model's layers are unknown (an ONNX model): the panel says why instead
      $("units").replaceChildren();
      app.units = [];
      drawBoxes();
      $("deconv-label").textContent = "";
      $("deconv-status").textContent = note;
      return;
    }
    const controller = begin("deconv");
    const layer = view.layer;
    $("units").replaceChildren();
    app.units = [];
    drawBoxes();
    $("deconv-status").textContent = app.sweep
      ? `projecting the strongest ${layer} units (after the running sweep: they share the server's worker)…`
      : `projecting the strongest ${layer} units…`;
    try {
      const result = await api("deconv", {method: "POST", signal: controller.signal,
        json: {image: view.image, model: view.model, layer, top_k: UNITS_PER_LAYER}});
      setVersion(result.version);
      if (result.label) $("deconv-label").textContent = `Projections: ${result.label}.`;
      app.units = result.units;
      $("units").replaceChildren(...result.units.map(unitCard));
      $("deconv-status").textContent = `The ${result.units.length} strongest ${layer} units on this image (one per ` +
        "feature map): the deconvnet projection beside the input under its receptive field. Click one for its " +
        "top-9 over the data set.";
      markUnit();
      drawBoxes();
    } catch (err) {
      if (err.name === "AbortError") return;
      $("deconv-status").textContent = "";
      showError(err);
    } finally {
      finish("deconv", controller);
    }
  }

  function pngImage(base64) {
    const img = new Image();
    img.src = `data:image/png;base64,${base64}`;
    return img;
  }

  // The projection cropped to the unit's receptive field, as the paper's figures show it.
  function projectionCanvas(unit) {
    const [x0, y0, x1, y1] = unit.box;
    const canvas = document.createElement("canvas");
    canvas.className = "projection";
    canvas.width = x1 - x0;
    canvas.height = y1 - y0;
    const img = pngImage(unit.projection_png);
    img.decode().then(() => canvas.getContext("2d").drawImage(img, x0, y0, x1 - x0, y1 - y0, 0, 0, x1 - x0,
      y1 - y0)).catch(() => {});
    return canvas;
  }

  function unitCard(unit) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "unit";
    button.dataset.channel = String(unit.channel);
    button.title = `feature map ${unit.channel} at (y ${unit.y}, x ${unit.x}); box ${unit.box.join(", ")}`;
    const patch = pngImage(unit.patch_png);
    patch.className = "patch";
    patch.alt = `input patch of map ${unit.channel}`;
    const caption = document.createElement("span");
    caption.className = "caption";
    const strong = document.createElement("b");
    strong.textContent = `map ${unit.channel}`;
    caption.append(strong, ` · activation ${unit.activation.toFixed(2)}`);
    button.append(projectionCanvas(unit), patch, caption);
    button.addEventListener("click", () => chooseUnit(unit.channel));
    button.addEventListener("mouseenter", () => drawBoxes(unit));
    button.addEventListener("mouseleave", () => drawBoxes());
    return button;
  }

  function markUnit() {
    for (const card of $("units").querySelectorAll(".unit")) {
      card.classList.toggle("selected", Number(card.dataset.channel) === view.unit);
    }
  }

  // The receptive field of the selected unit (and of the one under the pointer) over the image.
  function drawBoxes(hovered) {
    const canvas = $("box-overlay");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const selected = app.units.find((u) => u.channel === view.unit);
    for (const [unit, colour] of [[selected, "#ffffff"], [hovered, "#ffd400"]]) {
      if (!unit) continue;
      const [x0, y0, x1, y1] = unit.box;
      ctx.lineWidth = 2;
      ctx.strokeStyle = "rgba(0, 0, 0, 0.6)";
      ctx.strokeRect(x0 + 0.5, y0 + 0.5, x1 - x0 - 1, y1 - y0 - 1);
      ctx.lineWidth = 1;
      ctx.strokeStyle = colour;
      ctx.strokeRect(x0 + 0.5, y0 + 0.5, x1 - x0 - 1, y1 - y0 - 1);
    }
  }

  // ------------------------------------------------------------------------------------------ unit index
  function chooseUnit(channel) {
    view.unit = channel;
    writeHash(true);
    markUnit();
    drawBoxes();
    showUnit(channel);
  }

  function hideUnit() {
    if (app.requests.unit) app.requests.unit.abort();
    $("unit-detail").hidden = true;
    $("unit-top9").replaceChildren();
  }

  async function showUnit(channel) {
    const controller = begin("unit");
    const model = view.model;
    const layer = view.layer;
    $("unit-detail").hidden = false;
    $("unit-title").textContent = `${layer}, feature map ${channel}`;
    $("unit-data").textContent = "loading its top-9 over the data set…";
    $("unit-message").hidden = true;
    $("unit-top9").replaceChildren();
    try {
      const result = await api(`index/${encodeURIComponent(model)}/${layer}/${channel}`, {signal: controller.signal});
      $("unit-data").textContent = `Its ${result.units.length} strongest activations over ${result.data} (one per ` +
        "image, strongest first): the input under its receptive field.";
      $("unit-top9").replaceChildren(...result.units.map(top9Figure));
    } catch (err) {
      if (err.name === "AbortError") return;
      $("unit-data").textContent = "";
      if (err.status === 404 || err.status === 400) {   // no index for this model or layer: say so here
        $("unit-message").textContent = err.message;
        $("unit-message").hidden = false;
      } else {
        showError(err);
      }
    } finally {
      finish("unit", controller);
    }
  }

  function top9Figure(unit) {
    const figure = document.createElement("figure");
    const img = pngImage(unit.patch_png);
    img.className = "top9-patch";
    img.alt = `data set image ${unit.image}`;
    const caption = document.createElement("figcaption");
    caption.textContent = `#${unit.image}${unit.label ? ` ${unit.label}` : ""} · ${unit.activation.toFixed(2)}`;
    figure.append(img, caption);
    return figure;
  }

  // ------------------------------------------------------------------------------------------ occlusion
  // An integer field goes as a number; anything else as typed, for the server's message to name it.
  function numberField(id) {
    const text = $(id).value.trim();
    return /^-?\d+$/.test(text) ? Number(text) : text;
  }

  function setSweepStatus(text, done = 0, total = 1) {
    $("sweep-status").textContent = text;
    $("sweep-progress").max = total || 1;
    $("sweep-progress").value = done;
  }

  function stopSweep() {
    if (app.sweep) {
      app.sweep.abort();
      app.sweep = null;
    }
    $("cancel-sweep").disabled = true;
  }

  async function runSweep() {
    if (!view.image) {
      showError(new ApiError(0, "image: choose or upload an image first", "image"));
      return;
    }
    stopSweep();
    clearError();
    const controller = new AbortController();
    app.sweep = controller;
    const windowSize = numberField("window");
    const stride = numberField("stride");
    if (Number.isInteger(windowSize)) view.window = windowSize;
    if (Number.isInteger(stride)) view.stride = stride;
    writeHash();
    $("cancel-sweep").disabled = false;
    setSweepStatus("running: starting…");
    try {
      const response = await api("occlusion", {method: "POST", signal: controller.signal, raw: true,
        json: {image: view.image, model: view.model, window: windowSize, stride, target: view.target}});
      await readSweep(response, controller);
    } catch (err) {
      if (err.name === "AbortError") {
        if (app.sweep === controller || app.sweep === null) setSweepStatus("cancelled");
        return;
      }
      setSweepStatus("failed");
      showError(err);
    } finally {
      if (app.sweep === controller) {
        app.sweep = null;
        $("cancel-sweep").disabled = true;
      }
    }
  }

  // The NDJSON stream: progress lines, then a result or an error.
  async function readSweep(response, controller) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let ended = false;
    const handle = (line) => {
      if (!line.trim() || controller.signal.aborted) return;
      const event = JSON.parse(line);
      if (event.progress) {
        setSweepStatus(`running: ${event.progress.done}/${event.progress.total} positions`, event.progress.done,
          event.progress.total);
      } else if (event.result) {
        ended = true;
        showSweep(event.result);
      } else if (event.error) {
        ended = true;
        throw new ApiError(200, event.error.error, event.error.field);
      }
    };
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        handle(buffer.slice(0, newline));
        buffer = buffer.slice(newline + 1);
      }
    }
    handle(buffer + decoder.decode());
    if (!ended) throw new ApiError(0, "occlusion: the stream ended before its result", "occlusion");
  }

  function showSweep(result) {
    app.sweepResult = result;
    view.occlusion = true;
    writeHash();
    setVersion(result.version);
    const s = result.settings;
    const [rows, cols] = result.positions;
    setSweepStatus("done", 1, 1);
    if (result.label) $("occlusion-label").textContent = `Map: ${result.label}.`;
    $("occlusion-summary").textContent = `Target ${s.target_name} (class ${s.target}): probability ` +
      `${result.base_probability.toFixed(3)} unoccluded, ${result.min_probability.toFixed(3)} at the worst ` +
      `position; window ${s.window} px, stride ${s.stride} px, ${rows}×${cols} positions, fill ${s.fill}.`;
    showMode(result.mode, rows * cols);
    drawHeatmap();
  }

  // Which engine, precision and approximation drew the map, and the agreement gate's verdict behind the choice.
  function showMode(mode, positions) {
    if (!mode) {
      $("occlusion-mode").textContent = "";
      return;
    }
    const evaluated = mode.evaluated === null ? "every position evaluated" : `${mode.evaluated} of ${positions} ` +
      "positions evaluated, the others filled in from their neighbours";
    $("occlusion-mode").textContent = `Mode: ${mode.name} (${mode.engine} ${mode.precision}, ${evaluated}).` +
      (mode.gate ? ` Why: ${mode.gate}.` : "");
  }

  function clearHeatmap() {
    app.sweepResult = null;
    const canvas = $("heatmap");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    $("heatmap-legend").hidden = true;
    $("occlusion-summary").textContent = "";
    $("occlusion-mode").textContent = "";
    setSweepStatus("");
  }

  function colourAt(anchors, t) {
    const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (anchors.length - 1);
    const i = Math.min(anchors.length - 2, Math.floor(x));
    const f = x - i;
    return anchors[i].map((c, k) => Math.round(c + f * (anchors[i + 1][k] - c)));
  }

  // rows of values -> ImageData through ``colour(value) -> [r, g, b, a]``.
  function paint(rows, colour) {
    const height = rows.length;
    const width = rows[0].length;
    const image = new ImageData(width, height);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        image.data.set(colour(rows[y][x]), 4 * (y * width + x));
      }
    }
    return image;
  }

  // The colour at ``position`` (0..1 along ``anchors``); where the map says nothing the image shows through:
  // the opacity grows with ``strength`` (0..1, the size of the effect).
  function effectColour(anchors, position, strength, opacity) {
    const [r, g, b] = colourAt(anchors, position);
    return [r, g, b, Math.round(255 * opacity * Math.min(1, 1.5 * strength))];
  }

  // Probability: one cell per window position, centred on the window, smoothly scaled, red where hiding
  // that part of the image lowers the target's probability the most; attribution: per pixel, red for
  // evidence for the target, blue against.
  function drawHeatmap() {
    const canvas = $("heatmap");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const result = app.sweepResult;
    if (!result) return;
    const opacity = Number($("heatmap-opacity").value) / 100;
    if (view.map === "attribution") {
      const peak = Math.max(1e-12, ...result.attribution.map((row) => Math.max(...row.map(Math.abs))));
      const colour = (v) => effectColour(DIVERGING, (v / peak + 1) / 2, Math.abs(v / peak), opacity);
      ctx.putImageData(paint(result.attribution, colour), 0, 0);
      showLegend(DIVERGING, `${(-peak).toPrecision(2)} against`, `${peak.toPrecision(2)} for the target`);
      return;
    }
    const values = result.probability;
    const low = Math.min(...values.map((row) => Math.min(...row)));
    const high = Math.max(result.base_probability, ...values.map((row) => Math.max(...row)));
    const span = high - low || 1;
    const cells = document.createElement("canvas");
    cells.width = values[0].length;
    cells.height = values.length;
    const drop = (v) => effectColour(DROP, (high - v) / span, (high - v) / span, opacity);
    cells.getContext("2d").putImageData(paint(values, drop), 0, 0);
    const {window: windowSize, stride} = result.settings;
    const starts = result.starts;
    const first = starts[0] + windowSize / 2 - stride / 2;
    const extent = starts[starts.length - 1] - starts[0] + stride;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(cells, first, first, extent, extent);
    showLegend(DROP, `p ${high.toFixed(2)}`, `p ${low.toFixed(2)} (occluded there)`);
  }

  function showLegend(anchors, lowText, highText) {
    const bar = $("legend-bar");
    const ctx = bar.getContext("2d");
    for (let x = 0; x < bar.width; x++) {
      const [r, g, b] = colourAt(anchors, x / (bar.width - 1));
      ctx.fillStyle = `rgb(${r}, ${g}, ${b})`;
      ctx.fillRect(x, 0, 1, bar.height);
    }
    $("legend-low").textContent = lowText;
    $("legend-high").textContent = highText;
    $("heatmap-legend").hidden = false;
  }

  // ------------------------------------------------------------------------------------------ view
  function syncControls() {
    $("model-select").value = view.model || "";
    $("window").value = String(view.window);
    $("stride").value = String(view.stride);
    $("map-kind").value = view.map;
    const names = (currentModel() || {}).class_names || [];
    $("target").value = view.target !== null && view.target < names.length ? String(view.target) : "";
    markTab();
  }

  // Bring the page to ``next`` (from the URL), redoing only what changed.
  async function applyView(next, initial = false) {
    const before = {...view};
    Object.assign(view, next);
    if (!app.models.has(view.model)) view.model = before.model;
    if (view.model !== before.model) showModel();
    view.layer = fitLayer(view.layer);
    syncControls();
    const imageChanged = initial || view.image !== before.image || view.model !== before.model;
    if (imageChanged) {
      if (view.image) await showImage({sweep: view.occlusion});
      else if (view.unit !== null) showUnit(view.unit);
      return;
    }
    if (view.layer !== before.layer) {
      hideUnit();
      if (view.image) loadUnits();
    }
    if (view.unit !== before.unit || view.layer !== before.layer) {
      markUnit();
      drawBoxes();
      if (view.unit === null) hideUnit();
      else showUnit(view.unit);
    }
    if (view.map !== before.map) drawHeatmap();
    const settingsChanged = ["window", "stride", "target"].some((key) => view[key] !== before[key]);
    if (view.image && view.occlusion && (settingsChanged || !app.sweepResult) && !app.sweep) runSweep();
  }

  function changeModel() {
    view.model = $("model-select").value;
    view.unit = null;
    writeHash(true);
    showModel();
    hideUnit();
    if (view.image) showImage({sweep: view.occlusion});
  }

  // ------------------------------------------------------------------------------------------ events
  function bindDrop() {
    const zone = $("drop-zone");
    for (const type of ["dragover", "drop"]) {   // a file dropped beside the zone must not navigate away
      window.addEventListener(type, (event) => event.preventDefault());
    }
    zone.addEventListener("dragenter", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      const file = event.dataTransfer && event.dataTransfer.files[0];
      if (file) uploadFile(file);
    });
    zone.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") $("file-input").click();
    });
  }

  function bindControls() {
    $("file-input").addEventListener("change", (event) => {
      const file = event.target.files[0];
      uploadFile(file).finally(() => { event.target.value = ""; });
    });
    $("error-close").addEventListener("click", clearError);
    $("token-form").addEventListener("submit", submitToken);
    $("model-select").addEventListener("change", changeModel);
    $("run-sweep").addEventListener("click", () => runSweep());
    $("cancel-sweep").addEventListener("click", () => {
      stopSweep();
      setSweepStatus("cancelled");
    });
    $("map-kind").addEventListener("change", () => {
      view.map = $("map-kind").value;
      writeHash();
      drawHeatmap();
    });
    $("heatmap-opacity").addEventListener("input", drawHeatmap);
    $("target").addEventListener("change", () => {
      view.target = $("target").value === "" ? null : Number($("target").value);
      writeHash();
      if (view.image && (app.sweepResult || app.sweep)) runSweep();
    });
    for (const id of ["window", "stride"]) {
      $(id).addEventListener("keydown", (event) => { if (event.key === "Enter") runSweep(); });
    }
    // Back, forward and an edited hash (which also fires popstate) restore the view they name.
    window.addEventListener("popstate", () => applyView(readHash()).catch(showError));
  }

  async function start() {
    bindDrop();
    bindControls();
    const wanted = readHash();
    Object.assign(view, {model: wanted.model});
    try {
      await loadModels();
    } catch (err) {
      showError(err);
      return;
    }
    loadExamples();
    await applyView({...wanted, model: view.model}, true);
    writeHash();
  }

  document.addEventListener("DOMContentLoaded", () => { start().catch(showError); });
})();

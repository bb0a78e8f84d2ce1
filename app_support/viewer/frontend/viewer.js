// SynthBrain viewer: one or more NiiVue canvases side by side, crosshair locked across them.
//
// NiiVue itself is not in this repository: the page loads the niivue.umd.js that the installed
// nilearn package ships (served by Streamlit as a second component folder, named in spec.lib).
// This file speaks Streamlit's component protocol directly (postMessage), so it needs no build.
//
// spec (JSON) = {lib, height, sync, radiological, report, frames, panels: [{title, view, flex, show_render,
//   layers: [{data, id, name, label, colormap, opacity, cal_min, cal_max, colormap_negative, colorbar}],
//   surfaces: [{data, id, name, rgba, opacity}]}]}; "data" names a bytes argument of the render
//   message (gzip NIfTI for layers, MZ3 for surfaces), "id" is its content hash.
"use strict";

const VIEWS = { axial: 0, coronal: 1, sagittal: 2, multiplanar: 3, render: 4 };
const state = { spec: null, layoutKey: null, panels: [], chain: Promise.resolve(), lib: null,
                window: null, range: null, view: null };

function send(type, data) {
  window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type: type }, data || {}), "*");
}

let frameHeight = null;
function setHeight() {
  const height = Math.ceil(document.body.scrollHeight) + 2;
  if (height !== frameHeight) send("streamlit:setFrameHeight", { height: height });
  frameHeight = height;
}

function loadLibrary(lib) {
  if (state.lib) return state.lib;
  state.lib = new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = "../" + encodeURIComponent(lib) + "/niivue.umd.js";
    s.onload = () => (window.niivue ? resolve(window.niivue) : reject(new Error("NiiVue did not load")));
    s.onerror = () => reject(new Error("cannot load NiiVue from " + s.src));
    document.head.appendChild(s);
  });
  return state.lib;
}

function arrayBuffer(u8) {
  // a fresh ArrayBuffer holding exactly these bytes (the message's view may share a larger buffer)
  return u8.buffer.slice(u8.byteOffset, u8.byteOffset + u8.byteLength);
}

function fmt(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toFixed(a < 10 ? 4 : 1);
}

// ------------------------------------------------------------------------------------ toolbar

function el(tag, attrs, children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children || []) e.appendChild(c);
  return e;
}

function buildToolbar(hasSlices) {
  const bar = document.getElementById("toolbar");
  bar.innerHTML = "";
  bar.hidden = !hasSlices;
  if (!hasSlices) return;
  const view = el("select", { "data-control": "view", "aria-label": "view" });
  for (const [label, v] of [["Multiplanar", "multiplanar"], ["Axial", "axial"], ["Coronal", "coronal"],
                            ["Sagittal", "sagittal"], ["3D render", "render"]]) {
    view.appendChild(el("option", { value: v, text: label }));
  }
  view.addEventListener("change", () => { state.view = view.value; applyView(); });
  const level = el("input", { type: "range", "data-control": "level", "aria-label": "level", step: "any" });
  const width = el("input", { type: "range", "data-control": "width", "aria-label": "window width", step: "any" });
  const levelOut = el("span", { class: "value", "data-value": "level" });
  const widthOut = el("span", { class: "value", "data-value": "width" });
  const onWL = () => {
    const l = parseFloat(level.value), w = parseFloat(width.value);
    setWindow(l - w / 2, l + w / 2, null);
  };
  level.addEventListener("input", onWL);
  width.addEventListener("input", onWL);
  const radio = el("input", { type: "checkbox", "data-control": "radiological" });
  radio.addEventListener("change", () => {
    for (const p of state.panels) p.nv.setRadiologicalConvention(radio.checked);
  });
  const cross = el("input", { type: "checkbox", "data-control": "crosshair", checked: "" });
  cross.addEventListener("change", () => {
    for (const p of state.panels) { p.nv.setCrosshairWidth(cross.checked ? 1 : 0); }
  });
  const reset = el("button", { type: "button", text: "Reset", "data-control": "reset" });
  reset.addEventListener("click", () => {
    if (state.range) setWindow(state.range.cal_min, state.range.cal_max, null);
    for (const p of state.panels) {
      p.nv.scene.crosshairPos = [0.5, 0.5, 0.5];
      p.nv.scene.pan2Dxyzmm = [0, 0, 0, 1];
      p.nv.drawScene();
    }
    const lead = state.panels.find((p) => p.nv.volumes.length);
    if (lead) lead.nv.createOnLocationChange();
  });
  bar.append(
    el("label", {}, [document.createTextNode("View"), view]),
    el("label", { title: "window level (centre of the grey scale)" }, [document.createTextNode("Level"), level, levelOut]),
    el("label", { title: "window width (range of the grey scale)" }, [document.createTextNode("Window"), width, widthOut]),
    el("label", { title: "radiological convention: the subject's left on the right of the screen" },
       [radio, document.createTextNode("Radiological")]),
    el("label", {}, [cross, document.createTextNode("Crosshair")]),
    reset,
    el("span", { class: "hint", text: "click: move crosshair · right-drag: window/level · scroll (after a click): slice" }),
  );
}

function syncToolbar() {
  const w = state.window, r = state.range;
  if (!w || !r) return;
  const level = document.querySelector("[data-control=level]");
  const width = document.querySelector("[data-control=width]");
  if (!level) return;
  const span = Math.max(r.max - r.min, 1e-6);
  level.min = r.min; level.max = r.max; level.step = span / 500;
  width.min = span / 500; width.max = span * 2; width.step = span / 500;
  level.value = (w[0] + w[1]) / 2;
  width.value = w[1] - w[0];
  document.querySelector("[data-value=level]").textContent = fmt((w[0] + w[1]) / 2);
  document.querySelector("[data-value=width]").textContent = fmt(w[1] - w[0]);
  const view = document.querySelector("[data-control=view]");
  if (view && state.view) view.value = state.view;
}

// Window/level acts on the base image (layer 0) of every panel, so the panels stay comparable.
function setWindow(lo, hi, except) {
  if (!(hi > lo)) hi = lo + 1e-6;
  state.window = [lo, hi];
  for (const p of state.panels) {
    if (p === except || !p.nv.volumes.length) continue;
    const v = p.nv.volumes[0];
    v.cal_min = lo; v.cal_max = hi;
    p.nv.updateGLVolume();
  }
  syncToolbar();
}

function applyView() {
  for (const p of state.panels) {
    if (!p.nv.volumes.length) continue;  // a surfaces-only panel stays in 3D
    p.nv.setSliceType(VIEWS[state.view] ?? VIEWS.multiplanar);
  }
}

// ------------------------------------------------------------------------------------- panels

function buildPanels(spec, NV) {
  for (const p of state.panels) { try { p.nv.gl && p.nv.gl.getExtension("WEBGL_lose_context")?.loseContext(); } catch (e) { /* ignore */ } }
  const root = document.getElementById("panels");
  root.innerHTML = "";
  state.panels = [];
  for (const [i, ps] of spec.panels.entries()) {
    const canvas = el("canvas", { "data-panel": String(i) });
    const box = el("div", { class: "canvasbox" }, [canvas]);
    box.style.height = spec.height + "px";
    const readout = el("div", { class: "readout", "data-readout": String(i), text: "\u00a0" });
    const legend = el("div", { class: "legend", "data-legend": String(i) });
    const div = el("div", { class: "panel", "data-panel": String(i) },
                   [el("div", { class: "ptitle", text: ps.title || "" }), box, readout, legend]);
    div.style.flex = `${ps.flex || 1} 1 0`;
    root.appendChild(div);
    const nv = new NV.Niivue({
      backColor: [0, 0, 0, 1], crosshairColor: [1, 0.15, 0.15, 1], show3Dcrosshair: !!ps.layers.length,
      isOrientationTextVisible: true, showAllOrientationMarkers: true, fontColor: [1, 0.84, 0.3, 1],
      isOrientCube: !!ps.surfaces.length && !ps.layers.length, multiplanarPadPixels: 6,
      scrollRequiresFocus: true,  // the page scrolls over the viewer until it is clicked
      multiplanarShowRender: ps.show_render ? NV.SHOW_RENDER.ALWAYS : NV.SHOW_RENDER.NEVER,
      dragMode: NV.DRAG_MODE.contrast,
      isRadiologicalConvention: !!spec.radiological, dragAndDropEnabled: false, logLevel: "error",
      loadingText: "",
    });
    state.panels.push({ nv, box, readout, legend, canvas, sig: null, spec: ps,
                        attached: nv.attachToCanvas(canvas) });
  }
}

function panelSignature(ps) {
  return JSON.stringify([ps.layers.map((l) => l.id), ps.surfaces.map((s) => s.id)]);
}

async function loadPanel(p, ps, args, NV) {
  await p.attached;
  const nv = p.nv;
  for (const v of nv.volumes.slice().reverse()) nv.removeVolume(v);
  for (const m of nv.meshes.slice()) nv.removeMesh(m);
  for (const [k, l] of ps.layers.entries()) {
    const bytes = args[l.data];
    if (!bytes) throw new Error(`missing data for layer ${l.name}`);
    const img = await NV.NVImage.new(arrayBuffer(bytes), l.name, l.colormap || "gray", l.opacity ?? 1);
    styleLayer(img, l);
    nv.addVolume(img);
    img.colorbarVisible = k > 0 && !!l.colorbar;  // the base image's grey scale needs no bar
  }
  showColorbar(p, ps);
  for (const s of ps.surfaces) {
    const bytes = args[s.data];
    if (!bytes) throw new Error(`missing data for surface ${s.name}`);
    const mesh = await NV.NVMesh.readMesh(arrayBuffer(bytes), s.name, nv.gl, s.opacity ?? 1,
                                          new Uint8Array(s.rgba || [220, 200, 180, 255]), true);
    nv.addMesh(mesh);
  }
  nv.setSliceType(ps.layers.length ? (VIEWS[state.view || ps.view] ?? VIEWS.multiplanar) : VIEWS.render);
  if (!ps.layers.length) p.readout.textContent = "drag: rotate · scroll: zoom";
}

function showColorbar(p, ps) {
  // NiiVue draws the bar with its values; the text beneath says what they are, in which units
  const bars = ps.layers.slice(1).filter((l) => l.colorbar);
  p.nv.opts.isColorbar = bars.length > 0;
  // the 3D render sums an overlay along each ray: at full blend a sparse map still tints every ray
  // that crosses it (the whole brain), so a mapped overlay is blended in lightly there
  p.nv.opts.renderOverlayBlend = bars.length ? 0.3 : 1;
  p.legend.textContent = bars.map((l) => "Colour bar: " + l.colorbar).join(" · ");
  p.legend.hidden = !bars.length;
}

function styleLayer(img, l) {
  img.colormap = l.colormap || "gray";
  img.opacity = l.opacity ?? 1;
  if (l.cal_min != null) img.cal_min = l.cal_min;
  if (l.cal_max != null) img.cal_max = l.cal_max;
  if (l.colormap_negative) {
    img.colormapNegative = l.colormap_negative;
    img.cal_minNeg = l.cal_min != null ? -l.cal_min : NaN;
    img.cal_maxNeg = l.cal_max != null ? -l.cal_max : NaN;
  }
}

function restyle(p, ps) {
  // same data, new display settings (opacity slider, colormap): no reload
  for (const [k, l] of ps.layers.entries()) {
    const img = p.nv.volumes[k];
    if (!img) continue;
    if (k === 0 && state.window) { styleLayer(img, Object.assign({}, l, { cal_min: null, cal_max: null })); }
    else styleLayer(img, l);
  }
  for (const [k, s] of ps.surfaces.entries()) {
    const m = p.nv.meshes[k];
    if (m && s.opacity != null && m.opacity !== s.opacity) { m.opacity = s.opacity; m.updateMesh(p.nv.gl); }
  }
  showColorbar(p, ps);
  p.nv.updateGLVolume();
}

function wireEvents(spec) {
  let lastReport = 0;
  for (const [i, p] of state.panels.entries()) {
    p.nv.onLocationChange = (d) => {
      if (!p.nv.volumes.length) return;
      const mm = d.mm, vox = d.vox;
      const vals = d.values.map((v, k) => `${p.spec.layers[k]?.label || (k ? v.name : "intensity")} ${fmt(v.value)}`);
      const xyz = [0, 1, 2].map((k) => mm[k].toFixed(1)).join(", ");
      p.readout.textContent = `(${xyz}) mm · voxel [${vox[0]}, ${vox[1]}, ${vox[2]}] · ${vals.join(" · ")}`;
      p.readout.title = p.readout.textContent;
      p.readout.dataset.mm = JSON.stringify(Array.from(mm.slice(0, 3)));
      p.readout.dataset.value = String(d.values[0]?.value);
      setHeight();  // a readout that wraps to a second line must not be cut off by the frame
      if (spec.report && Date.now() - lastReport > 150) {
        lastReport = Date.now();
        send("streamlit:setComponentValue", { dataType: "json", value: {
          panel: i, mm: Array.from(mm.slice(0, 3)), voxel: Array.from(vox), value: d.values[0]?.value } });
      }
    };
    p.nv.onIntensityChange = (vol) => {
      if (p.nv.volumes[0] === vol) setWindow(vol.cal_min, vol.cal_max, p);
    };
  }
  const nvs = state.panels.map((p) => p.nv);
  for (const nv of nvs) nv.broadcastTo(spec.sync ? nvs.filter((o) => o !== nv) : [], { "2d": true, "3d": true });
}

// ------------------------------------------------------------------------------ frames (live)
// spec.frames = {name, labels, seconds}: every 4D layer holds one frame per label (a series through
// age). The slider steps all of them in the browser (NiiVue's setFrame4D re-uploads one texture), so
// dragging it shows each frame at once: no Streamlit rerun, no reload, the canvases and the crosshair,
// view and window/level stay. body[data-frame] is the frame on screen and body[data-frames-drawn]
// counts frames drawn (the benchmark's frames-per-second and the browser test read them).

const live = { key: null, index: 0, timer: null, drawn: 0 };

function showFrame(i) {
  const f = state.spec && state.spec.frames;
  if (!f) return;
  i = Math.max(0, Math.min(f.labels.length - 1, i | 0));
  live.index = i;
  for (const p of state.panels) {
    for (const v of p.nv.volumes) if (v.nFrame4D > 1) p.nv.setFrame4D(v.id, i);
  }
  const bar = document.getElementById("frames");
  bar.querySelector("[data-control=frame]").value = String(i);
  bar.querySelector("[data-value=frame]").textContent = f.labels[i];
  requestAnimationFrame(() => {
    live.drawn += 1;
    document.body.dataset.frame = String(i);
    document.body.dataset.framesDrawn = String(live.drawn);
  });
}

function play(on) {
  const btn = document.querySelector("[data-control=play]");
  clearInterval(live.timer);
  live.timer = null;
  if (on) {
    const n = state.spec.frames.labels.length;
    live.timer = setInterval(() => showFrame((live.index + 1) % n), 1000 * (state.spec.frames.seconds || 0.5));
  }
  if (btn) { btn.textContent = on ? "Pause" : "Play"; btn.setAttribute("aria-pressed", on ? "true" : "false"); }
}

function setupFrames(spec) {
  let bar = document.getElementById("frames");
  if (!bar) {
    bar = el("div", { id: "frames" });
    document.getElementById("panels").before(bar);
  }
  const f = spec.frames;
  bar.hidden = !f;
  if (!f) { play(false); bar.innerHTML = ""; live.key = null; return; }
  const key = JSON.stringify([f.name, f.labels]);
  if (key !== live.key) {  // a new series: start at its first frame; the same one keeps its place
    play(false);
    live.key = key;
    live.index = 0;
    bar.innerHTML = "";
    const slider = el("input", { type: "range", min: "0", max: String(f.labels.length - 1), step: "1", value: "0",
                                 "data-control": "frame", "aria-label": f.name || "frame" });
    slider.addEventListener("input", () => { play(false); showFrame(parseInt(slider.value, 10)); });
    const btn = el("button", { type: "button", text: "Play", "data-control": "play", "aria-pressed": "false" });
    btn.addEventListener("click", () => play(!live.timer));
    bar.append(el("span", { class: "fname", text: f.name || "Frame" }), slider, btn,
               el("span", { class: "value", "data-value": "frame", text: f.labels[0] }));
  }
  showFrame(live.index);
}

// ------------------------------------------------------------------------------------- render

async function render(args) {
  const spec = args.spec;
  document.body.dataset.ready = "0";
  const NV = await loadLibrary(spec.lib);
  const layoutKey = JSON.stringify([spec.height, spec.sync, spec.panels.map((p) => [p.title, p.flex, p.view,
                                     !!p.layers.length, !!p.show_render])]);
  const rebuild = layoutKey !== state.layoutKey;
  if (rebuild) {
    buildToolbar(spec.panels.some((p) => p.layers.length));
    buildPanels(spec, NV);
    state.layoutKey = layoutKey;
    state.window = null;
    state.view = spec.panels.find((p) => p.layers.length)?.view || "multiplanar";
  }
  setHeight();
  let reloaded = false;
  for (const [i, ps] of spec.panels.entries()) {
    const p = state.panels[i];
    p.spec = ps;
    const sig = panelSignature(ps);
    try {
      if (sig !== p.sig) {
        await loadPanel(p, ps, args, NV);
        p.sig = sig;
        reloaded = true;
      } else {
        restyle(p, ps);
      }
      p.box.querySelector(".perror")?.remove();
    } catch (err) {
      p.sig = null;
      p.box.querySelector(".perror")?.remove();
      p.box.appendChild(el("div", { class: "perror", text: "Cannot display: " + (err.message || err) }));
      document.getElementById("status").textContent = String(err.message || err);
    }
  }
  wireEvents(spec);
  state.spec = spec;
  setupFrames(spec);
  if (reloaded || !state.window) {
    const base = state.panels.find((p) => p.nv.volumes.length)?.nv.volumes[0];
    if (base) {
      const l0 = spec.panels.find((p) => p.layers.length).layers[0];
      state.range = { min: Math.min(base.global_min, 0), max: base.global_max,
                      cal_min: l0.cal_min ?? base.cal_min, cal_max: l0.cal_max ?? base.cal_max };
      setWindow(state.range.cal_min, state.range.cal_max, null);
    }
  }
  for (const p of state.panels) {
    p.nv.drawScene();
    if (p.nv.volumes.length) p.nv.createOnLocationChange();
  }
  setHeight();
  document.body.dataset.revision = JSON.stringify(spec.panels.map(panelSignature));
  document.body.dataset.ready = "1";
}

window.addEventListener("message", (event) => {
  const msg = event.data;
  if (!msg || msg.type !== "streamlit:render") return;
  // renders run one after another: a newer render waits for the previous load to finish
  state.chain = state.chain.then(() => render(msg.args)).catch((err) => {
    document.getElementById("status").textContent = "Viewer error: " + (err.message || err);
    document.body.dataset.ready = "error";
    setHeight();
  });
});
window.addEventListener("resize", () => { for (const p of state.panels) p.nv.resizeListener?.(); });
send("streamlit:componentReady", { apiVersion: 1 });

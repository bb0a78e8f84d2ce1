// SynthBrain viewer: one or more NiiVue canvases side by side, crosshair locked across them.
//
// NiiVue itself is not in this repository: the page loads the niivue.umd.js that the installed
// nilearn package ships (served by Streamlit as a second component folder, named in spec.lib).
// This file speaks Streamlit's component protocol directly (postMessage), so it needs no build.
//
// spec (JSON) = {lib, key, height, sync, radiological, report, screenshot, frames, panels: [{title, view, flex,
//   show_render, layers: [{data, id, name, label, colormap, opacity, cal_min, cal_max, colormap_negative,
//   colorbar, visible}],
//   surfaces: [{data, id, name, rgba, opacity}]}]}; "data" names a bytes argument of the render
//   message (gzip NIfTI for layers, MZ3 for surfaces), "id" is its content hash.
"use strict";

const VIEWS = { axial: 0, coronal: 1, sagittal: 2, multiplanar: 3, render: 4 };
const state = { spec: null, layoutKey: null, panels: [], lib: null, window: null, range: null };

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

// -------------------------------------------------------------------------------------- state
// What the user set (view, radiological, crosshair, window/level, zoom, 3D angle, clip plane,
// overlays) belongs to the viewer's key, not to one render: it stays in memory across renders (a new
// sample or frame under the same key only swaps the data) and in this tab's sessionStorage, so a
// remounted viewer (another page and back, a reload) comes back as the user left it.
// body[data-state] mirrors it (the browser tests read it).

const ui = { key: null, s: {} };
const CLIP = { axial: [0, 90], coronal: [180, 0], sagittal: [90, 0] };  // plane normal: azimuth, elevation (deg)

function uiLoad(key) {
  if (ui.key === (key || null) && ui.loaded) return;
  ui.key = key || null;
  ui.loaded = true;
  ui.s = {};
  if (!ui.key) return;
  try { ui.s = JSON.parse(window.sessionStorage.getItem("synthbrain-viewer:" + ui.key) || "{}") || {}; } catch (e) { ui.s = {}; }
}

let saveTimer = null;
function uiSave() {
  document.body.dataset.state = JSON.stringify(ui.s);
  if (!ui.key) return;
  clearTimeout(saveTimer);
  saveTimer = setTimeout(uiFlush, 80);
}

function uiFlush() {
  clearTimeout(saveTimer);
  if (!ui.key) return;
  try { window.sessionStorage.setItem("synthbrain-viewer:" + ui.key, JSON.stringify(ui.s)); } catch (e) { /* storage off: memory only */ }
}

function leadPanel() {
  return state.panels.find((p) => p.nv.volumes.length) || state.panels[0];
}

function uiCapture() {
  // crosshair and 2D zoom/pan of the lead panel, 3D angle and zoom (the panels are linked)
  const p = leadPanel();
  if (!p || !p.loaded) return;
  const sc = p.nv.scene;
  if (p.nv.volumes.length) {
    const mm = p.nv.frac2mm(sc.crosshairPos);
    ui.s.crosshair = [mm[0], mm[1], mm[2]];
    ui.s.pan = Array.from(sc.pan2Dxyzmm);
  }
  ui.s.azimuth = sc.renderAzimuth;
  ui.s.elevation = sc.renderElevation;
  ui.s.zoom3d = sc.volScaleMultiplier;
  uiSave();
}

function applyClip() {
  const c = ui.s.clip || { axis: "off", depth: 0 };
  const dir = CLIP[c.axis];
  for (const p of state.panels) p.nv.setClipPlane(dir ? [c.depth, dir[0], dir[1]] : [2, 0, 0]);
}

function uiApply(spec) {
  const s = ui.s;
  // the session default (sidebar) wins when it changes; otherwise the viewer keeps its own toggle
  if (s.radiological === undefined || s.radioDefault !== !!spec.radiological) s.radiological = !!spec.radiological;
  s.radioDefault = !!spec.radiological;
  for (const p of state.panels) {
    const nv = p.nv, sc = nv.scene;
    nv.opts.isRadiologicalConvention = !!s.radiological;
    nv.setCrosshairWidth(s.crosshairOff ? 0 : 1);
    if (nv.volumes.length) {
      if (s.crosshair) {
        const f = nv.mm2frac(s.crosshair);
        if ([0, 1, 2].every((k) => Number.isFinite(f[k]) && f[k] >= 0 && f[k] <= 1)) sc.crosshairPos = new Float32Array([f[0], f[1], f[2]]);
      }
      if (s.pan && s.pan.length === 4) sc.pan2Dxyzmm = new Float32Array(s.pan);
    }
    if (Number.isFinite(s.azimuth)) { sc.renderAzimuth = s.azimuth; sc.renderElevation = s.elevation; }
    if (Number.isFinite(s.zoom3d) && s.zoom3d > 0) sc.volScaleMultiplier = s.zoom3d;
  }
  applyClip();
  applyView();
  syncToolbar();
  uiSave();
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

function overlayLabels(spec) {
  const out = [];
  for (const p of spec.panels) for (const l of p.layers.slice(1)) {
    const name = l.label || l.name;
    if (!out.includes(name)) out.push(name);
  }
  return out;
}

function buildToolbar(spec) {
  const hasSlices = spec.panels.some((p) => p.layers.length);
  const bar = document.getElementById("toolbar");
  bar.innerHTML = "";
  bar.hidden = false;
  const items = [];
  if (hasSlices) {
    const view = el("select", { "data-control": "view", "aria-label": "view" });
    for (const [label, v] of [["Multiplanar", "multiplanar"], ["Axial", "axial"], ["Coronal", "coronal"],
                              ["Sagittal", "sagittal"], ["3D render", "render"]]) {
      view.appendChild(el("option", { value: v, text: label }));
    }
    view.addEventListener("change", () => { ui.s.view = view.value; applyView(); syncToolbar(); uiSave(); });
    const level = el("input", { type: "range", "data-control": "level", "aria-label": "level", step: "any" });
    const width = el("input", { type: "range", "data-control": "width", "aria-label": "window width", step: "any" });
    const levelOut = el("span", { class: "value", "data-value": "level" });
    const widthOut = el("span", { class: "value", "data-value": "width" });
    const onWL = () => {
      const l = parseFloat(level.value), w = parseFloat(width.value);
      setWindow(l - w / 2, l + w / 2, null, true);
    };
    level.addEventListener("input", onWL);
    width.addEventListener("input", onWL);
    const radio = el("input", { type: "checkbox", "data-control": "radiological" });
    radio.addEventListener("change", () => {
      ui.s.radiological = radio.checked;
      for (const p of state.panels) p.nv.setRadiologicalConvention(radio.checked);
      uiSave();
    });
    items.push(el("label", {}, [document.createTextNode("View"), view]),
               el("label", { title: "window level (centre of the grey scale)" }, [document.createTextNode("Level"), level, levelOut]),
               el("label", { title: "window width (range of the grey scale)" }, [document.createTextNode("Window"), width, widthOut]),
               el("label", { title: "radiological convention: the subject's left on the right of the screen" },
                  [radio, document.createTextNode("Radiological")]));
    const cross = el("input", { type: "checkbox", "data-control": "crosshair", checked: "" });
    cross.addEventListener("change", () => {
      ui.s.crosshairOff = !cross.checked;
      for (const p of state.panels) p.nv.setCrosshairWidth(cross.checked ? 1 : 0);
      uiSave();
    });
    items.push(el("label", {}, [cross, document.createTextNode("Crosshair")]));
  }
  const labels = overlayLabels(spec);
  if (labels.length) {
    const boxes = labels.map((name) => {
      const box = el("input", { type: "checkbox", "data-control": "overlay", "data-name": name });
      box.addEventListener("change", () => {
        ui.s.overlays = Object.assign({}, ui.s.overlays, { [name]: box.checked });
        restyleAll(); uiSave();
      });
      return el("label", { title: "show or hide this overlay" }, [box, document.createTextNode(name)]);
    });
    const alpha = el("input", { type: "range", min: "0", max: "1", step: "0.05", "data-control": "overlay-opacity",
                                "aria-label": "overlay opacity" });
    alpha.addEventListener("input", () => { ui.s.overlayOpacity = parseFloat(alpha.value); restyleAll(); syncToolbar(); uiSave(); });
    items.push(...boxes, el("label", { title: "opacity of the overlays (1 = as the page set it)" },
                            [document.createTextNode("Opacity"), alpha, el("span", { class: "value", "data-value": "overlay-opacity" })]));
  }
  if (hasSlices) {  // NiiVue clips volume renderings (not meshes): a slice panel switches to its render
    const axis = el("select", { "data-control": "clip", "aria-label": "3D clip plane" });
    for (const [label, v] of [["No clip", "off"], ["Clip axial", "axial"], ["Clip coronal", "coronal"], ["Clip sagittal", "sagittal"]]) {
      axis.appendChild(el("option", { value: v, text: label }));
    }
    const depth = el("input", { type: "range", min: "-0.6", max: "0.6", step: "0.01", value: "0", "data-control": "clip-depth",
                                "aria-label": "clip plane depth" });
    const onClip = () => {
      ui.s.clip = { axis: axis.value, depth: parseFloat(depth.value) };
      if (axis.value !== "off" && hasSlices && ui.s.view !== "render" && !spec.panels.some((p) => p.show_render || !p.layers.length)) {
        ui.s.view = "render";  // the clip plane cuts the 3D render: show it
        applyView();
      }
      applyClip(); syncToolbar(); uiSave();
    };
    axis.addEventListener("change", onClip);
    depth.addEventListener("input", onClip);
    items.push(el("label", { title: "3D: cut the rendering with a plane to see inside" }, [axis, depth]));
  }
  const reset = el("button", { type: "button", text: "Reset", "data-control": "reset",
                               title: "crosshair to the centre, zoom, window/level, 3D angle and clip plane back to the start" });
  reset.addEventListener("click", () => {
    for (const k of ["crosshair", "pan", "window", "azimuth", "elevation", "zoom3d", "clip"]) delete ui.s[k];
    if (state.range) setWindow(state.range.cal_min, state.range.cal_max, null);
    for (const p of state.panels) {
      p.nv.scene.crosshairPos = new Float32Array([0.5, 0.5, 0.5]);
      p.nv.scene.pan2Dxyzmm = new Float32Array([0, 0, 0, 1]);
      p.nv.scene.volScaleMultiplier = 1;
      p.nv.scene.renderAzimuth = 110; p.nv.scene.renderElevation = 10;
      p.nv.drawScene();
    }
    applyClip(); syncToolbar(); uiSave();
    const lead = state.panels.find((p) => p.nv.volumes.length);
    if (lead) lead.nv.createOnLocationChange();
  });
  const shot = el("button", { type: "button", text: "Screenshot (PNG)", "data-control": "screenshot",
                              title: "download what the viewer shows now, as a PNG picture" });
  shot.addEventListener("click", () => screenshot());
  items.push(reset, shot);
  if (hasSlices) items.push(el("span", { class: "hint", text: "click: move crosshair · right-drag: window/level · scroll (after a click): slice" }));
  else items.push(el("span", { class: "hint", text: "drag: rotate · scroll: zoom" }));
  bar.append(...items);
}

function syncToolbar() {
  const q = (sel) => document.querySelector(sel);
  const view = q("[data-control=view]");
  if (view) view.value = ui.s.view || "multiplanar";
  const radio = q("[data-control=radiological]");
  if (radio) radio.checked = !!ui.s.radiological;
  const cross = q("[data-control=crosshair]");
  if (cross) cross.checked = !ui.s.crosshairOff;
  for (const box of document.querySelectorAll("[data-control=overlay]")) box.checked = overlayVisible(box.dataset.name, true);
  const alpha = q("[data-control=overlay-opacity]");
  if (alpha) {
    alpha.value = String(ui.s.overlayOpacity ?? 1);
    q("[data-value=overlay-opacity]").textContent = (ui.s.overlayOpacity ?? 1).toFixed(2);
  }
  const clip = q("[data-control=clip]");
  if (clip) {
    const c = ui.s.clip || { axis: "off", depth: 0 };
    clip.value = c.axis;
    q("[data-control=clip-depth]").value = String(c.depth);
    q("[data-control=clip-depth]").disabled = c.axis === "off";
  }
  const w = state.window, r = state.range;
  const level = q("[data-control=level]");
  const width = q("[data-control=width]");
  if (!w || !r || !level) return;
  const span = Math.max(r.max - r.min, 1e-6);
  level.min = r.min; level.max = r.max; level.step = span / 500;
  width.min = span / 500; width.max = span * 2; width.step = span / 500;
  level.value = (w[0] + w[1]) / 2;
  width.value = w[1] - w[0];
  q("[data-value=level]").textContent = fmt((w[0] + w[1]) / 2);
  q("[data-value=width]").textContent = fmt(w[1] - w[0]);
}

// Window/level acts on the base image (layer 0) of every panel, so the panels stay comparable; one
// the user set (``user``) is kept for the next sample, a page's default is not.
function setWindow(lo, hi, except, user) {
  if (!(hi > lo)) hi = lo + 1e-6;
  state.window = [lo, hi];
  if (user) { ui.s.window = [lo, hi]; uiSave(); }
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
    p.nv.setSliceType(VIEWS[ui.s.view] ?? VIEWS[p.spec.view] ?? VIEWS.multiplanar);
  }
}

// ----------------------------------------------------------------------------------- screenshot
// What the viewer shows, as one PNG: every panel's canvas with its title above and its readout and
// colour-bar line below (the titles say what kind of volume it is: synthetic, derived or real).
// A WebGL canvas keeps its pixels only until the next frame, so each is copied right after a draw.

function wrapText(g, text, width) {
  // the words of ``text`` in lines no wider than ``width`` (canvas text does not wrap by itself)
  const lines = [];
  let line = "";
  for (const word of text.split(/\s+/)) {
    const next = line ? line + " " + word : word;
    if (line && g.measureText(next).width > width) { lines.push(line); line = word; } else line = next;
  }
  if (line) lines.push(line);
  return lines;
}

function screenshot() {
  const dpr = window.devicePixelRatio || 1;
  const gap = Math.round(6 * dpr), band = Math.round(20 * dpr), font = Math.round(13 * dpr);
  const small = `${Math.round(font * 0.85)}px monospace`;
  const name = (state.spec && state.spec.screenshot) || "synthbrain_view.png";
  const sizes = state.panels.map((p) => [p.canvas.width, p.canvas.height]);
  const out = document.createElement("canvas");
  const g = out.getContext("2d");
  g.font = small;
  const lines = state.panels.map((p, i) => (p.nv.volumes.length ? [p.readout.textContent.trim()] : [])
    .concat(p.legend.hidden ? [] : [p.legend.textContent.trim()])
    .filter((t) => t && t !== "\u00a0")
    .flatMap((t) => wrapText(g, t, sizes[i][0] - 4)));
  const foot = Math.max(...lines.map((l) => l.length), 0) * band;
  out.width = sizes.reduce((a, [w]) => a + w, 0) + gap * Math.max(state.panels.length - 1, 0);
  out.height = band + Math.max(...sizes.map(([, h]) => h)) + foot + band;
  g.fillStyle = "#fff"; g.fillRect(0, 0, out.width, out.height);
  g.fillStyle = "#1f2430"; g.textBaseline = "middle";
  let x = 0;
  for (const [i, p] of state.panels.entries()) {
    const [w, h] = sizes[i];
    g.font = `600 ${font}px sans-serif`;
    g.fillText(p.spec.title || "", x + 2, band / 2, w - 4);
    p.nv.drawScene();
    g.drawImage(p.canvas, x, band, w, h);
    g.font = small;
    for (const [k, t] of lines[i].entries()) g.fillText(t, x + 2, band + h + band * (k + 0.5));
    x += w + gap;
  }
  g.font = `${Math.round(font * 0.85)}px sans-serif`;
  g.fillStyle = "#555";
  g.fillText(`SynthBrain viewer screenshot: ${name}, ${new Date().toISOString().slice(0, 19).replace("T", " ")} UTC`, 2,
             out.height - band / 2, out.width - 4);
  out.toBlob((blob) => {
    if (!blob) return;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    document.body.dataset.screenshot = `${out.width}x${out.height}`;
  }, "image/png");
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
      isRadiologicalConvention: !!(ui.s.radiological ?? spec.radiological), dragAndDropEnabled: false, logLevel: "error",
      loadingText: "",
    });
    state.panels.push({ nv, box, readout, legend, canvas, sig: null, spec: ps, loaded: false,
                        attached: nv.attachToCanvas(canvas) });
    // zoom, pan and 3D rotation fire no location event: read them when the user lets go
    let t = null;
    const later = () => { clearTimeout(t); t = setTimeout(uiCapture, 150); };
    for (const ev of ["pointerup", "wheel", "keyup"]) canvas.addEventListener(ev, later, { passive: true });
  }
}

function panelSignature(ps) {
  return JSON.stringify([ps.layers.map((l) => l.id), ps.surfaces.map((s) => s.id)]);
}

async function loadPanel(p, ps, args, NV) {
  await p.attached;
  p.loaded = false;  // until the new data are in, the scene is not the user's (uiCapture waits)
  const nv = p.nv;
  for (const v of nv.volumes.slice().reverse()) nv.removeVolume(v);
  for (const m of nv.meshes.slice()) nv.removeMesh(m);
  for (const [k, l] of ps.layers.entries()) {
    const bytes = args[l.data];
    if (!bytes) throw new Error(`missing data for layer ${l.name}`);
    const img = await NV.NVImage.new(arrayBuffer(bytes), l.name, l.colormap || "gray", l.opacity ?? 1);
    styleLayer(img, l, k);
    nv.addVolume(img);
  }
  showColorbar(p, ps);
  for (const s of ps.surfaces) {
    const bytes = args[s.data];
    if (!bytes) throw new Error(`missing data for surface ${s.name}`);
    const mesh = await NV.NVMesh.readMesh(arrayBuffer(bytes), s.name, nv.gl, s.opacity ?? 1,
                                          new Uint8Array(s.rgba || [220, 200, 180, 255]), true);
    nv.addMesh(mesh);
  }
  nv.setSliceType(ps.layers.length ? (VIEWS[ui.s.view || ps.view] ?? VIEWS.multiplanar) : VIEWS.render);
  if (!ps.layers.length) p.readout.textContent = "drag: rotate · scroll: zoom";
  p.loaded = true;
}

function showColorbar(p, ps) {
  // NiiVue draws the bar with its values; the text beneath says what they are, in which units
  const bars = ps.layers.slice(1).filter((l) => l.colorbar && overlayVisible(l.label || l.name, l.visible));
  p.nv.opts.isColorbar = bars.length > 0;
  // the 3D render sums an overlay along each ray: at full blend a sparse map still tints every ray
  // that crosses it (the whole brain), so a mapped overlay is blended in lightly there
  p.nv.opts.renderOverlayBlend = bars.length ? 0.3 : 1;
  p.legend.textContent = bars.map((l) => "Colour bar: " + l.colorbar).join(" · ");
  p.legend.hidden = !bars.length;
}

function overlayVisible(name, byPage) {
  const mine = (ui.s.overlays || {})[name];
  return mine ?? (byPage ?? true);
}

function styleLayer(img, l, k) {
  img.colormap = l.colormap || "gray";
  img.opacity = l.opacity ?? 1;
  img.colorbarVisible = false;  // the base image's grey scale needs no bar
  if (k > 0) {  // an overlay: the toolbar shows / hides it and scales its opacity
    const on = overlayVisible(l.label || l.name, l.visible);
    img.opacity = on ? (l.opacity ?? 1) * (ui.s.overlayOpacity ?? 1) : 0;
    img.colorbarVisible = on && !!l.colorbar;
  }
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
    if (k === 0 && state.window) { styleLayer(img, Object.assign({}, l, { cal_min: null, cal_max: null }), 0); }
    else styleLayer(img, l, k);
  }
  for (const [k, s] of ps.surfaces.entries()) {
    const m = p.nv.meshes[k];
    if (m && s.opacity != null && m.opacity !== s.opacity) { m.opacity = s.opacity; m.updateMesh(p.nv.gl); }
  }
  showColorbar(p, ps);
  p.nv.updateGLVolume();
}

function restyleAll() {
  for (const p of state.panels) if (p.loaded && p.spec.layers.length) restyle(p, p.spec);
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
      uiCapture();
      setHeight();  // a readout that wraps to a second line must not be cut off by the frame
      if (spec.report && Date.now() - lastReport > 150) {
        lastReport = Date.now();
        send("streamlit:setComponentValue", { dataType: "json", value: {
          panel: i, mm: Array.from(mm.slice(0, 3)), voxel: Array.from(vox), value: d.values[0]?.value, state: ui.s } });
      }
    };
    p.nv.onIntensityChange = (vol) => {
      if (p.nv.volumes[0] === vol) setWindow(vol.cal_min, vol.cal_max, p, true);
    };
    p.nv.onAzimuthElevationChange = () => uiCapture();
    p.nv.onZoom3DChange = () => uiCapture();
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
  uiLoad(spec.key);
  state.spec = spec;
  const rebuild = layoutKey !== state.layoutKey;
  if (rebuild) {  // new canvases; what the user set (ui.s) stays
    buildPanels(spec, NV);
    state.layoutKey = layoutKey;
    state.window = null;
  }
  const toolKey = JSON.stringify([spec.panels.some((p) => p.layers.length), overlayLabels(spec)]);
  if (rebuild || toolKey !== state.toolKey) {  // an overlay came or went: its controls too
    buildToolbar(spec);
    state.toolKey = toolKey;
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
  setupFrames(spec);
  if (reloaded || !state.window) {
    const base = state.panels.find((p) => p.nv.volumes.length)?.nv.volumes[0];
    if (base) {
      const l0 = spec.panels.find((p) => p.layers.length).layers[0];
      state.range = { min: Math.min(base.global_min, 0), max: base.global_max,
                      cal_min: l0.cal_min ?? base.cal_min, cal_max: l0.cal_max ?? base.cal_max };
      // the user's window/level stays for the next sample; the page's default only until then
      const w = ui.s.window;
      if (w) setWindow(w[0], w[1], null); else setWindow(state.range.cal_min, state.range.cal_max, null);
    }
  }
  uiApply(spec);
  for (const p of state.panels) {
    p.nv.drawScene();
    if (p.nv.volumes.length) p.nv.createOnLocationChange();
  }
  setHeight();
  document.body.dataset.revision = JSON.stringify(spec.panels.map(panelSignature));
  document.body.dataset.ready = "1";
}

// Renders run one after another, and only the newest waiting one runs: while a volume loads, the
// renders that arrive (a dragged slider's values) replace each other, so the viewer never falls behind.
let pending = null, rendering = false;
async function pump() {
  rendering = true;
  while (pending) {
    const args = pending;
    pending = null;
    try { await render(args); } catch (err) {
      document.getElementById("status").textContent = "Viewer error: " + (err.message || err);
      document.body.dataset.ready = "error";
      setHeight();
    }
  }
  rendering = false;
}
window.addEventListener("message", (event) => {
  const msg = event.data;
  if (!msg || msg.type !== "streamlit:render") return;
  pending = msg.args;
  if (!rendering) pump();
});
window.addEventListener("pagehide", () => { uiCapture(); uiFlush(); });
window.addEventListener("resize", () => { for (const p of state.panels) p.nv.resizeListener?.(); });
send("streamlit:componentReady", { apiVersion: 1 });

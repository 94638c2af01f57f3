// Stemset's page: list recordings, upload and follow a job, play stems in sync (Web Audio API).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { token: localStorage.getItem("stemset-token") || "", config: null };

// ------------------------------------------------------------------ API

// The token goes only to this page's own origin: a stem URL on another host (a bucket's public
// URL, or anything a response names) is fetched without it.
function sameOrigin(url) {
  try {
    return new URL(url, window.location.href).origin === window.location.origin;
  } catch (e) {
    return false;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token && sameOrigin(path)) headers["Authorization"] = "Bearer " + state.token;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) {
    $("#token-form").hidden = false;
    throw new Error("The API needs a token: enter it at the top right.");
  }
  return resp;
}

async function apiJson(path, options) {
  const resp = await api(path, options);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error((body.error && body.error.message) || `HTTP ${resp.status}`);
  return body;
}

function showMessage(text) {
  const el = $("#message");
  el.textContent = text || "";
  el.hidden = !text;
}

const fmtTime = (s) => {
  s = Math.max(0, s || 0);
  return `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// ------------------------------------------------------------------ config and recordings

async function loadConfig() {
  state.config = await apiJson("/api/config");
  const profile = $("#profile");
  profile.replaceChildren(...Object.entries(state.config.profiles).map(([name, p]) =>
    el("option", { value: name, title: p.description || "" }, name)));
  const strategy = $("#strategy");
  strategy.replaceChildren(el("option", { value: "" }, "profile default"),
    ...Object.keys(state.config.strategies).map((s) => el("option", { value: s }, s)));
}

async function loadRecordings() {
  const data = await apiJson("/api/recordings");
  const body = $("#recordings tbody");
  body.replaceChildren();
  for (const rec of data.recordings) {
    const cells = Object.entries(rec.strategies)
      .filter(([, s]) => s.default || s.state !== "missing")
      .map(([name, s]) => {
        const playable = Object.keys(s.stems).length > 0;
        const button = el("button", { class: `strategy ${s.state}`, title: s.reason || s.state,
          "data-partition": rec.partition, "data-strategy": name }, `${name} · ${s.state}`);
        if (playable) button.addEventListener("click", () => player.load(`${rec.name} — ${name}`, s.stems));
        else button.disabled = true;
        return button;
      });
    body.append(el("tr", { "data-partition": rec.partition },
      el("td", {}, rec.name), el("td", {}, rec.profile), el("td", {}, fmtTime(rec.duration_s)),
      el("td", {}, ...cells)));
  }
  const t = data.totals;
  $("#totals").textContent = `${t.recordings} recordings · ${fmtTime(t.audio_hours * 3600)} of audio · ` +
    `${t.current} current, ${t.stale} stale, ${t.missing} missing stem sets · $${t.cost_usd.toFixed(2)}`;
}

// ------------------------------------------------------------------ upload and job

function uploadWithProgress(profile, form) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/api/upload/${encodeURIComponent(profile)}`);
    if (state.token) xhr.setRequestHeader("Authorization", "Bearer " + state.token);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) setJob("uploading", (e.loaded / e.total) * 0.1);
    };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status === 401) $("#token-form").hidden = false;
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new Error((body.error && body.error.message) || `HTTP ${xhr.status}`));
    };
    xhr.onerror = () => reject(new Error("The upload failed (network error)."));
    xhr.send(form);
  });
}

function setJob(status, progress, steps, error) {
  $("#job").hidden = false;
  const badge = $("#job-status");
  badge.textContent = status;
  badge.className = `badge ${status}`;
  $("#job").dataset.status = status;
  $("#job-progress").value = progress || 0;
  $("#job-steps").replaceChildren(...(steps || []).map((s) =>
    el("span", { class: `step ${s.status}` }, `${s.step}: ${s.status}`)));
  const err = $("#job-error");
  err.textContent = error || "";
  err.hidden = !error;
}

async function onUpload(event) {
  event.preventDefault();
  const file = $("#file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  if ($("#strategy").value) form.append("strategy", $("#strategy").value);
  $("#upload-button").disabled = true;
  $("#job-name").textContent = file.name;
  try {
    setJob("uploading", 0);
    const job = await uploadWithProgress($("#profile").value, form);
    $("#job").dataset.jobId = job.job_id;
    await followJob(job.job_id, file.name);
  } catch (err) {
    setJob("error", 0, [], err.message);
  } finally {
    $("#upload-button").disabled = false;
  }
}

async function followJob(jobId, name) {
  for (;;) {
    const job = await apiJson(`/api/jobs/${encodeURIComponent(jobId)}`);
    setJob(job.status, 0.1 + 0.9 * job.progress, job.steps, job.error);
    if (job.status === "complete") {
      await loadRecordings();
      await player.load(`${name} — ${job.strategies[0]}`, job.stems);
      return;
    }
    if (job.status === "error") return;
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ------------------------------------------------------------------ player

const player = {
  ctx: null, master: null, stems: [], duration: 0, offset: 0, startedAt: 0, playing: false, frame: 0,

  audioContext() {
    if (!this.ctx) {
      this.ctx = new AudioContext();
      this.master = this.ctx.createGain();
      this.master.connect(this.ctx.destination);
    }
    return this.ctx;
  },

  async load(title, stemUrls) {
    this.stop();
    const root = $("#player");
    root.dataset.state = "loading";
    $("#player-title").textContent = `${title} (loading…)`;
    const ctx = this.audioContext();
    const names = Object.keys(stemUrls);
    const buffers = await Promise.all(names.map(async (name) => {
      const resp = await api(stemUrls[name]);
      if (!resp.ok) throw new Error(`Could not fetch stem ${name}: HTTP ${resp.status}`);
      return ctx.decodeAudioData(await resp.arrayBuffer());
    }));
    this.stems = names.map((name, i) => {
      const gain = ctx.createGain();
      gain.connect(this.master);
      return { name, buffer: buffers[i], gain, volume: 1, muted: false, solo: false, source: null, canvas: null };
    });
    this.duration = Math.max(...buffers.map((b) => b.duration), 0);
    this.offset = 0;
    this.render();
    $("#player-title").textContent = title;
    root.dataset.state = "ready";
    for (const id of ["#play", "#stop", "#seek"]) $(id).disabled = false;
    this.tick();
  },

  render() {
    const rows = this.stems.map((stem) => {
      const canvas = el("canvas", { width: 600, height: 56, class: "wave" });
      canvas.addEventListener("click", (e) => {
        const rect = canvas.getBoundingClientRect();
        this.seek(((e.clientX - rect.left) / rect.width) * this.duration);
      });
      stem.canvas = canvas;
      stem.peaks = peaks(stem.buffer, canvas.width);
      const volume = el("input", { type: "range", min: 0, max: 1.5, step: 0.01, value: 1, class: "volume",
        "aria-label": `${stem.name} volume` });
      volume.addEventListener("input", () => { stem.volume = Number(volume.value); this.mix(); });
      const mute = el("button", { class: "mute small", "aria-pressed": "false" }, "M");
      mute.addEventListener("click", () => { stem.muted = !stem.muted; mute.setAttribute("aria-pressed", stem.muted); this.mix(); });
      const solo = el("button", { class: "solo small", "aria-pressed": "false" }, "S");
      solo.addEventListener("click", () => { stem.solo = !stem.solo; solo.setAttribute("aria-pressed", stem.solo); this.mix(); });
      return el("div", { class: "stem", "data-stem": stem.name },
        el("span", { class: "stem-name" }, stem.name), mute, solo, volume, canvas);
    });
    $("#stems").replaceChildren(...rows);
    this.mix();
    this.draw();
  },

  mix() {
    const anySolo = this.stems.some((s) => s.solo);
    for (const s of this.stems) {
      const audible = anySolo ? s.solo : !s.muted;
      s.gain.gain.value = audible ? s.volume : 0;
      s.canvas && s.canvas.classList.toggle("silent", !audible);
    }
  },

  position() {
    if (!this.playing) return this.offset;
    return Math.min(this.offset + (this.ctx.currentTime - this.startedAt), this.duration);
  },

  async play() {
    const ctx = this.audioContext();
    if (ctx.state !== "running") await ctx.resume();
    if (this.playing) return this.pause();
    if (this.offset >= this.duration) this.offset = 0;
    const when = ctx.currentTime + 0.05; // one start time for every stem: they stay in sync
    for (const s of this.stems) {
      s.source = ctx.createBufferSource();
      s.source.buffer = s.buffer;
      s.source.connect(s.gain);
      s.source.start(when, this.offset);
    }
    this.startedAt = when;
    this.playing = true;
    $("#play").textContent = "Pause";
    $("#player").dataset.state = "playing";
  },

  halt() {
    for (const s of this.stems) {
      if (s.source) { try { s.source.stop(); } catch (e) { /* already stopped */ } s.source.disconnect(); s.source = null; }
    }
    this.playing = false;
    $("#play").textContent = "Play";
  },

  pause() {
    this.offset = this.position();
    this.halt();
    $("#player").dataset.state = "paused";
  },

  stop() {
    this.halt();
    this.offset = 0;
    if (this.stems.length) $("#player").dataset.state = "ready";
  },

  seek(seconds) {
    const wasPlaying = this.playing;
    this.halt();
    this.offset = Math.max(0, Math.min(seconds, this.duration));
    if (wasPlaying) this.play();
  },

  draw() {
    const at = this.duration ? this.position() / this.duration : 0;
    for (const s of this.stems) drawWave(s.canvas, s.peaks, at);
    $("#seek").value = at;
    $("#clock").textContent = `${fmtTime(this.position())} / ${fmtTime(this.duration)}`;
  },

  tick() {
    cancelAnimationFrame(this.frame);
    const loop = () => {
      if (this.playing && this.position() >= this.duration) { this.halt(); this.offset = this.duration; }
      this.draw();
      this.frame = requestAnimationFrame(loop);
    };
    this.frame = requestAnimationFrame(loop);
  },
};

function peaks(buffer, columns) {
  // min/max of the channels' mean over each column of the canvas
  const chans = [];
  for (let c = 0; c < buffer.numberOfChannels; c++) chans.push(buffer.getChannelData(c));
  const per = Math.max(1, Math.floor(buffer.length / columns));
  const out = new Float32Array(columns * 2);
  for (let x = 0; x < columns; x++) {
    let lo = 0, hi = 0;
    const end = Math.min(buffer.length, (x + 1) * per);
    for (let i = x * per; i < end; i++) {
      let v = 0;
      for (const ch of chans) v += ch[i];
      v /= chans.length;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    out[2 * x] = lo;
    out[2 * x + 1] = hi;
  }
  return out;
}

function drawWave(canvas, data, at) {
  const g = canvas.getContext("2d");
  const { width: w, height: h } = canvas;
  let top = 1e-6;
  for (const v of data) top = Math.max(top, Math.abs(v));
  g.clearRect(0, 0, w, h);
  const split = Math.floor(at * w);
  for (let x = 0; x < w; x++) {
    g.fillStyle = x < split ? "#4f8cff" : "#9aa4b2";
    const lo = (0.9 * data[2 * x]) / top, hi = (0.9 * data[2 * x + 1]) / top;
    const y0 = (1 - hi) * h / 2, y1 = (1 - lo) * h / 2;
    g.fillRect(x, y0, 1, Math.max(1, y1 - y0));
  }
  g.fillStyle = "#ff5a5a";
  g.fillRect(split, 0, 2, h);
}

// ------------------------------------------------------------------ wiring

window.stemsetPlayer = player; // for tests and the console

async function start() {
  try {
    await loadConfig();
    await loadRecordings();
    showMessage("");
  } catch (err) {
    showMessage(err.message);
  }
}

$("#upload-form").addEventListener("submit", onUpload);
$("#refresh").addEventListener("click", () => loadRecordings().catch((e) => showMessage(e.message)));
$("#play").addEventListener("click", () => player.play());
$("#stop").addEventListener("click", () => player.stop());
$("#seek").addEventListener("input", (e) => player.seek(Number(e.target.value) * player.duration));
$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("#token").value.trim();
  localStorage.setItem("stemset-token", state.token);
  $("#token-form").hidden = true;
  start();
});
start();

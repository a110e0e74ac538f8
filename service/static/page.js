// The page: submit a fit, draw its progress from the job's event stream, ask for a prediction.
// Plain JS and canvas: the service serves everything the page loads.
"use strict";

const $ = (id) => document.getElementById(id);
const live = {
  jobId: null, epochs: 0, epoch: [], w: [], b: null, loss: [], source: null, frame: 0,
  poll: 0, restreams: 0,
};
const POLL_MS = 1000; // while the event stream is down: how often the job is asked for
const RESTREAMS = 3; // streams opened again without an event before the page only polls
const ENDED = ["succeeded", "failed", "cancelled"];

function numbers(text) {
  return text.split(/[\s,;]+/).filter((t) => t !== "").map(Number);
}

function optionalNumber(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

// Significant digits, not decimals: w = 0.002 shows as 0.002, 7.999881234 as 7.99988.
function fmt(value, digits = 6) {
  return Number.isFinite(value) ? String(Number(value.toPrecision(digits))) : String(value);
}

function describeProblem(problem) {
  const fields = (problem.errors || []).map((e) => `${e.field}: ${e.message}`);
  return [problem.title, problem.detail, ...fields].filter(Boolean).join(" — ");
}

// The token lives in the page's memory (its input) only: sent as a header, never in a URL or a
// cookie, and gone with the page.
function authorization() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function request(method, url, body) {
  const init = { method, headers: { Accept: "application/json", ...authorization() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  const data = await response.json().catch(() => ({ title: `HTTP ${response.status}` }));
  if (!response.ok) {
    const error = new Error(describeProblem(data));
    error.status = response.status;
    throw error;
  }
  return data;
}

// -- the charts --------------------------------------------------------------------------

function drawChart(canvas, xs, series, lastX) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 58, right: 12, top: 10, bottom: 26 };
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#555";
  ctx.strokeStyle = "#bbb";
  ctx.strokeRect(pad.left, pad.top, width - pad.left - pad.right, height - pad.top - pad.bottom);
  const values = series.flatMap((s) => s.ys);
  if (xs.length === 0 || values.length === 0) return;
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) { lo -= 1; hi += 1; }
  const x0 = 0;
  const x1 = Math.max(lastX, xs[xs.length - 1], 1);
  const px = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const py = (y) => height - pad.bottom - ((y - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
  ctx.textAlign = "right";
  ctx.fillText(hi.toPrecision(4), pad.left - 4, pad.top + 9);
  ctx.fillText(lo.toPrecision(4), pad.left - 4, height - pad.bottom);
  ctx.textAlign = "center";
  ctx.fillText("0", pad.left, height - 8);
  ctx.fillText(`epoch ${x1}`, width - pad.right - 30, height - 8);
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    s.ys.forEach((y, i) => (i === 0 ? ctx.moveTo(px(xs[i]), py(y)) : ctx.lineTo(px(xs[i]), py(y))));
    ctx.stroke();
    ctx.fillStyle = s.color;
    ctx.textAlign = "left";
    ctx.fillText(s.label, pad.left + 6 + 24 * series.indexOf(s), pad.top + 12);
  }
  canvas.dataset.lastEpoch = String(xs[xs.length - 1]);
}

function redraw() {
  live.frame = 0;
  const lastX = Math.max(live.epochs - 1, 0);
  drawChart($("loss-chart"), live.epoch, [{ ys: live.loss, color: "#c0392b", label: "loss" }], lastX);
  const params = [{ ys: live.w, color: "#2471a3", label: "w" }];
  if (live.b) params.push({ ys: live.b, color: "#229954", label: "b" });
  drawChart($("param-chart"), live.epoch, params, lastX);
}

function scheduleRedraw() {
  if (!live.frame) live.frame = requestAnimationFrame(redraw);
}

// -- the fit -----------------------------------------------------------------------------

function jobPath(jobId, rest = "") {
  return `/jobs/${encodeURIComponent(jobId)}${rest}`;
}

function setStream(state, message) {
  $("stream-state").dataset.state = state;
  $("stream-state").textContent = message;
}

function setRunning(running) {
  // Fit waits only while the stream is healthy: after an error it is free again at once.
  $("fit-button").disabled = running;
  $("cancel-button").hidden = !running;
  $("cancel-button").disabled = false;
}

function resetSeries() {
  Object.assign(live, { epoch: [], w: [], b: null, loss: [] });
  redraw();
}

function stopWatching() {
  if (live.source) live.source.close();
  live.source = null;
  clearTimeout(live.poll);
  live.poll = 0;
}

function onProgress(event) {
  const data = JSON.parse(event.data);
  live.restreams = 0;
  live.epoch.push(...data.epoch);
  live.w.push(...data.w);
  live.loss.push(...data.loss);
  if (data.b) live.b = (live.b || []).concat(data.b);
  const last = data.epoch.length - 1;
  $("live-epoch").textContent = String(data.progress.epoch);
  $("live-epochs").textContent = String(data.progress.epochs);
  $("live-w").textContent = fmt(data.w[last]);
  $("live-loss").textContent = fmt(data.loss[last], 4);
  $("fit-status").textContent = `Job ${live.jobId}: running.`;
  setStream("live", "Live: the fit's progress streams in.");
  setRunning(true);
  scheduleRedraw();
}

function finish(job) {
  if (job.id !== live.jobId) return;
  stopWatching();
  setRunning(false);
  setStream("closed", "The stream has ended with the job.");
  $("live-epoch").textContent = String(job.progress.epoch);
  $("fit-status").textContent = `Job ${job.id}: ${job.status}.`;
  $("fit-status").dataset.status = job.status;
  if (job.result) {
    const r = job.result;
    const b = job.params.fit_intercept ? `, b = ${fmt(r.b)}` : ""; // only a fitted b
    $("result").textContent =
      `Model version ${r.model_version}: w = ${fmt(r.w)}${b}, mse on the data = ${fmt(r.mse, 4)}.`;
  } else if (job.error) {
    $("result").textContent = describeProblem(job.error);
  }
  redraw();
}

function lost(jobId, message) {
  if (jobId !== live.jobId) return;
  stopWatching();
  setRunning(false);
  setStream("lost", "The job is gone from the service.");
  $("fit-status").textContent = `Job ${jobId}: lost (${message}). Fit again to start over.`;
  $("fit-status").dataset.status = "lost";
}

function watch(jobId) {
  stopWatching();
  // EventSource reconnects by itself with Last-Event-ID after a drop, and the service resumes
  // the stream there; it gives up when an answer is no stream (the job is gone, say).
  const source = new EventSource(jobPath(jobId, "/events"));
  live.source = source;
  source.addEventListener("open", () => {
    setStream("live", "Live: the fit's progress streams in.");
    setRunning(true);
  });
  source.addEventListener("progress", onProgress);
  source.addEventListener("end", (e) => finish(JSON.parse(e.data)));
  source.addEventListener("problem", (e) => lost(jobId, describeProblem(JSON.parse(e.data))));
  source.addEventListener("error", () => {
    if (live.source !== source) return;
    setRunning(false);
    if (source.readyState === EventSource.CONNECTING) {
      setStream("reconnecting", "The connection to the service was lost: reconnecting…");
      return;
    }
    source.close();
    live.source = null;
    poll(jobId);
  });
}

// The stream gave up: ask for the job until it answers, then stream again from the start (or,
// when streams keep failing, only poll until it ends).
function poll(jobId) {
  setStream("polling", "The event stream stopped: asking the service for the job…");
  const tick = async () => {
    if (jobId !== live.jobId) return;
    try {
      const job = await request("GET", jobPath(jobId));
      if (live.restreams < RESTREAMS) {
        live.restreams += 1;
        resetSeries();
        watch(jobId);
        return;
      }
      if (ENDED.includes(job.status)) {
        finish(job);
        return;
      }
      $("fit-status").textContent = `Job ${jobId}: ${job.status} (epoch ${job.progress.epoch}).`;
    } catch (error) {
      if (error.status === 404) {
        lost(jobId, error.message);
        return;
      }
      setStream("polling", `The service does not answer (${error.message}): asking again…`);
    }
    live.poll = setTimeout(tick, POLL_MS);
  };
  tick();
}

async function startFit(event) {
  event.preventDefault();
  stopWatching();
  const body = {
    x: numbers($("x").value),
    y: numbers($("y").value),
    epochs: optionalNumber("epochs") ?? 100,
    learning_rate: optionalNumber("learning_rate") ?? 0.01,
    init_w: optionalNumber("init_w") ?? 1.0,
    batch_size: optionalNumber("batch_size"),
    fit_intercept: $("fit_intercept").checked,
  };
  const seed = optionalNumber("seed");
  if (seed !== null) body.seed = seed;
  $("fit-button").disabled = true;
  $("result").textContent = "";
  $("fit-status").dataset.status = "";
  try {
    const job = await request("POST", "/fit", body);
    Object.assign(live, { jobId: job.id, epochs: job.params.epochs, restreams: 0 });
    resetSeries();
    $("fit-status").textContent = `Job ${job.id}: ${job.status}.`;
    $("live-epochs").textContent = String(job.params.epochs);
    setRunning(true);
    watch(job.id);
  } catch (error) {
    setRunning(false);
    $("fit-status").textContent = `The fit was refused: ${error.message}`;
  }
}

async function cancelFit() {
  const jobId = live.jobId;
  $("cancel-button").disabled = true;
  try {
    finish(await request("POST", jobPath(jobId, "/cancel")));
  } catch (error) {
    $("cancel-button").disabled = false;
    $("fit-status").textContent = `Job ${jobId}: the cancel was refused: ${error.message}`;
  }
}

// -- predictions -------------------------------------------------------------------------

async function predict(event) {
  event.preventDefault();
  const hours = $("hours").value.trim();
  try {
    const p = await request("GET", `/predict?hours=${encodeURIComponent(hours)}`);
    $("score").textContent = fmt(p.score);
    $("score-version").textContent = `(model version ${p.model_version})`;
  } catch (error) {
    $("score").textContent = "–";
    $("score-version").textContent = error.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("fit-form").addEventListener("submit", startFit);
  $("cancel-button").addEventListener("click", cancelFit);
  $("predict-form").addEventListener("submit", predict);
  redraw();
});

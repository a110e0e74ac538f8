// The page: submit a fit, draw its progress from the job's event stream, ask for a prediction.
// Plain JS and canvas: the service serves everything the page loads.
"use strict";

const $ = (id) => document.getElementById(id);
const live = { epochs: 0, epoch: [], w: [], b: null, loss: [], source: null, frame: 0 };

function numbers(text) {
  return text.split(/[\s,;]+/).filter((t) => t !== "").map(Number);
}

function optionalNumber(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function describeProblem(problem) {
  const fields = (problem.errors || []).map((e) => `${e.field}: ${e.message}`);
  return [problem.title, problem.detail, ...fields].filter(Boolean).join(" — ");
}

async function request(method, url, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  const data = await response.json().catch(() => ({ title: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(describeProblem(data));
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

function onProgress(event) {
  const data = JSON.parse(event.data);
  live.epoch.push(...data.epoch);
  live.w.push(...data.w);
  live.loss.push(...data.loss);
  if (data.b) live.b = (live.b || []).concat(data.b);
  const last = data.epoch.length - 1;
  $("live-epoch").textContent = String(data.progress.epoch);
  $("live-epochs").textContent = String(data.progress.epochs);
  $("live-w").textContent = data.w[last].toPrecision(6);
  $("live-loss").textContent = data.loss[last].toPrecision(4);
  $("fit-status").textContent = `Job ${live.jobId}: running.`;
  scheduleRedraw();
}

function onEnd(event) {
  const job = JSON.parse(event.data);
  live.source.close();
  $("fit-button").disabled = false;
  $("live-epoch").textContent = String(job.progress.epoch);
  $("fit-status").textContent = `Job ${job.id}: ${job.status}.`;
  $("fit-status").dataset.status = job.status;
  if (job.result) {
    const r = job.result;
    $("result").textContent =
      `Model version ${r.model_version}: w = ${r.w.toPrecision(6)}, b = ${r.b.toPrecision(6)}, ` +
      `mse on the data = ${r.mse.toPrecision(4)}.`;
  } else if (job.error) {
    $("result").textContent = describeProblem(job.error);
  }
  redraw();
}

async function startFit(event) {
  event.preventDefault();
  if (live.source) live.source.close();
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
    Object.assign(live, { jobId: job.id, epochs: job.params.epochs, epoch: [], w: [], b: null, loss: [] });
    $("fit-status").textContent = `Job ${job.id}: ${job.status}.`;
    $("live-epochs").textContent = String(job.params.epochs);
    redraw();
    // EventSource reconnects by itself with Last-Event-ID; the service resumes the stream there.
    live.source = new EventSource(`/jobs/${job.id}/events`);
    live.source.addEventListener("progress", onProgress);
    live.source.addEventListener("end", onEnd);
    live.source.addEventListener("problem", (e) => {
      live.source.close();
      $("fit-button").disabled = false;
      $("fit-status").textContent = describeProblem(JSON.parse(e.data));
    });
  } catch (error) {
    $("fit-button").disabled = false;
    $("fit-status").textContent = `The fit was refused: ${error.message}`;
  }
}

// -- predictions -------------------------------------------------------------------------

async function predict(event) {
  event.preventDefault();
  const hours = $("hours").value.trim();
  try {
    const p = await request("GET", `/predict?hours=${encodeURIComponent(hours)}`);
    $("score").textContent = p.score.toFixed(2);
    $("score-version").textContent = `(model version ${p.model_version})`;
  } catch (error) {
    $("score").textContent = "–";
    $("score-version").textContent = error.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("fit-form").addEventListener("submit", startFit);
  $("predict-form").addEventListener("submit", predict);
  redraw();
});

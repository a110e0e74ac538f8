// The page: show the served model, the kept versions and the recent jobs; submit a fit, draw
// its progress from the job's event stream; serve a kept version; ask for a prediction.
// Plain JS and canvas: the service serves everything the page loads.
"use strict";

const $ = (id) => document.getElementById(id);
const live = {
  jobId: null, epochs: 0, epoch: [], w: [], b: null, loss: [], valLoss: null, source: null,
  frame: 0, poll: 0, restreams: 0, fitted: false,
};
// The latest request of each list: an answer to an older one (slower) is dropped.
const asked = { served: 0, versions: 0, jobs: 0 };
const POLL_MS = 1000; // while the event stream is down: how often the job is asked for
const RESTREAMS = 3; // streams opened again without an event before the page only polls
const ENDED = ["succeeded", "failed", "cancelled"];
const CHART_POINTS = 1000; // an ended job's history is drawn thinned to this, like its stream
const VERSIONS_SHOWN = 20;
const JOBS_SHOWN = 10;

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

// An element with attributes (dataset entries under `data`) and children: text is never parsed
// as HTML, whatever a job id or a problem holds.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "data") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function shortId(id) {
  return el("code", { title: id }, id.length > 8 ? `${id.slice(0, 8)}…` : id);
}

function when(timestamp) {
  return timestamp ? new Date(timestamp).toLocaleString() : "";
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
    error.problem = data;
    throw error;
  }
  return data;
}

// -- the charts --------------------------------------------------------------------------

// A log axis draws log10 of each value; a value of 0 (a perfect fit) has no logarithm and is
// drawn at the smallest positive one, as GET /history/plot?log=true does.
function logValues(values) {
  const positive = values.filter((v) => v > 0);
  const floor = positive.length ? Math.min(...positive) : 1;
  return (v) => Math.log10(Math.max(v, floor));
}

function decadeLabel(k) {
  return k >= -3 && k <= 4 ? String(Number((10 ** k).toPrecision(1))) : `1e${k}`;
}

// The y axis: where values go and which ticks it labels, on a linear or a log scale.
function yAxis(values, scale) {
  if (scale === "log") {
    const t = logValues(values);
    const logs = values.map(t);
    const lo = Math.floor(Math.min(...logs));
    const top = Math.max(Math.ceil(Math.max(...logs)), lo + 1);
    // at most about 6 labelled decades, the axis ending on one at each end
    const step = Math.max(1, Math.ceil((top - lo) / 5));
    const hi = lo + step * Math.ceil((top - lo) / step);
    const ticks = [];
    for (let k = hi; k >= lo; k -= step) ticks.push({ at: k, label: decadeLabel(k) });
    return { t, lo, hi, ticks };
  }
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) { lo -= 1; hi += 1; }
  const ticks = [{ at: hi, label: hi.toPrecision(4) }, { at: lo, label: lo.toPrecision(4) }];
  return { t: (v) => v, lo, hi, ticks };
}

function drawChart(canvas, xs, series, lastX, scale = "linear") {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 58, right: 12, top: 10, bottom: 26 };
  ctx.clearRect(0, 0, width, height);
  ctx.lineWidth = 1; // the context keeps the last drawing's: every drawing starts the same
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#555";
  ctx.strokeStyle = "#bbb";
  ctx.strokeRect(pad.left, pad.top, width - pad.left - pad.right, height - pad.top - pad.bottom);
  canvas.dataset.scale = scale;
  canvas.dataset.points = "0";
  canvas.dataset.yTicks = "";
  const values = series.flatMap((s) => s.ys);
  if (xs.length === 0 || values.length === 0) return;
  const axis = yAxis(values, scale);
  const x0 = 0;
  const x1 = Math.max(lastX, xs[xs.length - 1], 1);
  const px = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const py = (y) => height - pad.bottom
    - ((axis.t(y) - axis.lo) / (axis.hi - axis.lo)) * (height - pad.top - pad.bottom);
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const tick of axis.ticks) {
    const y = height - pad.bottom
      - ((tick.at - axis.lo) / (axis.hi - axis.lo)) * (height - pad.top - pad.bottom);
    ctx.fillText(tick.label, pad.left - 4, y);
    ctx.strokeStyle = "#eee";
    ctx.beginPath();
    ctx.moveTo(pad.left + 1, y);
    ctx.lineTo(width - pad.right - 1, y);
    ctx.stroke();
  }
  ctx.textBaseline = "alphabetic";
  ctx.textAlign = "center";
  ctx.fillText("0", pad.left, height - 8);
  ctx.fillText(`epoch ${x1}`, width - pad.right - 30, height - 8);
  let labelX = pad.left + 6;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    s.ys.forEach((y, i) => (i === 0 ? ctx.moveTo(px(xs[i]), py(y)) : ctx.lineTo(px(xs[i]), py(y))));
    ctx.stroke();
    ctx.fillStyle = s.color;
    ctx.textAlign = "left";
    ctx.fillText(s.label, labelX, pad.top + 12);
    labelX += ctx.measureText(s.label).width + 10;
  }
  // What a test (or a curious reader of the DOM) can see of a canvas.
  canvas.dataset.lastEpoch = String(xs[xs.length - 1]);
  canvas.dataset.points = String(xs.length);
  canvas.dataset.series = series.map((s) => s.label).join(",");
  canvas.dataset.yTicks = axis.ticks.map((tick) => tick.label).join(" ");
}

function redraw() {
  live.frame = 0;
  const lastX = Math.max(live.epochs - 1, 0);
  const log = $("log-scale").checked;
  const losses = [{ ys: live.loss, color: "#c0392b", label: "loss" }];
  if (live.valLoss) losses.push({ ys: live.valLoss, color: "#8e44ad", label: "held-out loss" });
  drawChart($("loss-chart"), live.epoch, losses, lastX, log ? "log" : "linear");
  $("loss-caption").textContent = log ? "loss per epoch (log scale)" : "loss per epoch";
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
  Object.assign(live, { epoch: [], w: [], b: null, loss: [], valLoss: null });
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
  if (data.val_loss) live.valLoss = (live.valLoss || []).concat(data.val_loss);
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

// What a job came to: its status, and its model (or its problem).
function showOutcome(job) {
  $("live-epoch").textContent = String(job.progress.epoch);
  $("live-epochs").textContent = String(job.progress.epochs);
  $("fit-status").textContent = `Job ${job.id}: ${job.status}.`;
  $("fit-status").dataset.status = job.status;
  if (job.result) {
    const r = job.result;
    const b = job.params.fit_intercept ? `, b = ${fmt(r.b)}` : ""; // only a fitted b
    const notes = [];
    if (r.val_mse !== undefined && r.val_mse !== null) {
      const r2 = r.val_r2 === null || r.val_r2 === undefined ? "" : `, r² = ${fmt(r.val_r2, 4)}`;
      notes.push(`On the held-out rows: mse = ${fmt(r.val_mse, 4)}${r2}.`);
    }
    if (r.stopped_early) notes.push(`Stopped early after ${r.epochs_run} epochs.`);
    if (r.published === false) {
      const why = r.not_published_because ? `: ${r.not_published_because}` : "";
      notes.push(`Kept, not served${why}.`);
    }
    $("result").textContent = [
      `Model version ${r.model_version}: w = ${fmt(r.w)}${b}, mse on the data = ${fmt(r.mse, 4)}.`,
      ...notes,
    ].join(" ");
  } else if (job.error) {
    $("result").textContent = describeProblem(job.error);
  } else {
    $("result").textContent = "";
  }
}

function finish(job) {
  if (job.id !== live.jobId) return;
  stopWatching();
  setRunning(false);
  setStream("closed", "The stream has ended with the job.");
  showOutcome(job);
  redraw();
  refreshAll();
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

// The fit's body: what the form holds, the optional fields only when they are set.
function fitBody() {
  const body = {
    x: numbers($("x").value),
    y: numbers($("y").value),
    epochs: optionalNumber("epochs") ?? 100,
    learning_rate: optionalNumber("learning_rate") ?? 0.01,
    batch_size: optionalNumber("batch_size"),
    fit_intercept: $("fit_intercept").checked,
  };
  const initFrom = $("init_from").value;
  if (initFrom === "") body.init_w = optionalNumber("init_w") ?? 1.0;
  else body.init_from = initFrom === "served" ? "served" : Number(initFrom); // a warm start
  for (const name of ["seed", "validation_fraction", "tol", "n_iter_no_change"]) {
    const value = optionalNumber(name);
    if (value !== null) body[name] = value;
  }
  if ($("publish").value !== "") body.publish = $("publish").value;
  return body;
}

// A refused fit: mark each field the problem names (a field may be "publish, tol", or "x[3]").
function markInvalid(problem) {
  for (const input of $("fit-form").querySelectorAll("[aria-invalid]")) {
    input.removeAttribute("aria-invalid");
    input.removeAttribute("title");
  }
  for (const issue of (problem && problem.errors) || []) {
    for (const field of issue.field.split(",")) {
      const input = $(field.trim().replace(/\[.*$/, ""));
      if (input && $("fit-form").contains(input)) {
        input.setAttribute("aria-invalid", "true");
        input.title = issue.message;
      }
    }
  }
}

async function startFit(event) {
  event.preventDefault();
  live.fitted = true; // from now on the page shows this fit, not what it found on opening
  stopWatching();
  const body = fitBody();
  $("fit-button").disabled = true;
  $("result").textContent = "";
  $("fit-status").dataset.status = "";
  markInvalid(null);
  try {
    const job = await request("POST", "/fit", body);
    Object.assign(live, { jobId: job.id, epochs: job.params.epochs, restreams: 0 });
    resetSeries();
    $("fit-status").textContent = `Job ${job.id}: ${job.status}.`;
    $("live-epochs").textContent = String(job.params.epochs);
    setRunning(true);
    watch(job.id);
    refreshJobs();
  } catch (error) {
    setRunning(false);
    markInvalid(error.problem);
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

// GET /predict's query: the hours, and with a coverage chosen, the coverage and a method only
// when one is chosen (the service's default is the version's first).
function predictQuery() {
  const query = new URLSearchParams({ hours: $("hours").value.trim() });
  const coverage = $("coverage").value;
  if (coverage !== "") {
    query.set("coverage", coverage);
    if ($("method").value !== "") query.set("method", $("method").value);
  }
  return query.toString();
}

// The interval beside the score: "90% interval: [7.5, 8.5] (conformal)"; null bounds mean the
// version's held-out rows are too few for that coverage.
function showInterval(interval) {
  const out = $("interval");
  const { lower, upper, coverage, method } = interval || {};
  const unbounded = Boolean(interval) && (lower === null || upper === null);
  Object.assign(out.dataset, {
    lower: interval && !unbounded ? String(lower) : "",
    upper: interval && !unbounded ? String(upper) : "",
    coverage: interval ? String(coverage) : "",
    method: interval ? method : "",
    unbounded: String(unbounded),
  });
  if (!interval) {
    out.textContent = "";
    return;
  }
  const share = `${fmt(coverage * 100, 4)}%`;
  out.textContent = unbounded
    ? `${share} interval: unbounded (${method}: too few held-out rows for ${share})`
    : `${share} interval: [${fmt(lower)}, ${fmt(upper)}] (${method})`;
}

// A method is chosen only for an interval.
function syncMethod() {
  $("method").disabled = $("coverage").value === "";
}

async function predict(event) {
  event.preventDefault();
  try {
    const p = await request("GET", `/predict?${predictQuery()}`);
    $("score").textContent = fmt(p.score);
    showInterval(p.interval || null);
    $("score-version").textContent = `(model version ${p.model_version})`;
  } catch (error) {
    $("score").textContent = "–";
    showInterval(null);
    $("score-version").textContent = error.message;
  }
}

// -- what the service holds: the served model, the kept versions, the recent jobs -----------

function served(model) {
  const b = model.params.fit_intercept
    ? [", b = ", el("span", { id: "served-b" }, fmt(model.b))]
    : [];
  return [
    "Served: model version ", el("strong", { id: "served-version" }, String(model.version)),
    ": w = ", el("span", { id: "served-w" }, fmt(model.w)), ...b,
    ", trained by job ", el("span", { id: "served-job" }, shortId(model.job_id)),
    ` at ${when(model.trained_at)}.`,
  ];
}

async function refreshServed() {
  const out = $("served");
  const ask = ++asked.served;
  try {
    const model = await request("GET", "/model");
    if (ask !== asked.served) return;
    out.dataset.version = String(model.version);
    out.replaceChildren(...served(model));
  } catch (error) {
    if (ask !== asked.served) return;
    out.dataset.version = "";
    out.textContent = error.status === 503 && error.problem.type === "model-not-ready"
      ? "No model is served yet: fit one."
      : `The served model is unknown: ${error.message}`;
  }
}

const METRICS = {
  val_mse: "held-out mse", val_r2: "held-out r²", train_mse: "train mse", train_r2: "train r²",
};
const PLAIN_METRICS = { mse: "mse", final_loss: "last batch loss" }; // a version without a split

function metrics(m) {
  if (!m) return [];
  let shown = Object.keys(METRICS).filter((k) => m[k] !== null && m[k] !== undefined);
  let names = METRICS;
  if (shown.length === 0) {
    names = PLAIN_METRICS;
    shown = Object.keys(PLAIN_METRICS).filter((k) => m[k] !== null && m[k] !== undefined);
  }
  return shown.map((k) => el("span", { className: "metric", data: { metric: k } },
    `${names[k]} ${fmt(m[k], 4)}`));
}

// The version's live quality: how it did on the outcomes recorded while it was live.
function quality(q) {
  if (!q) return ["–"];
  const parts = [`MAE ${fmt(q.mae, 4)}`, `RMSE ${fmt(q.rmse, 4)}`];
  if (q.coverage !== null && q.coverage !== undefined) parts.push(`in 90%: ${fmt(q.coverage * 100, 3)}%`);
  parts.push(`n ${q.outcomes}`);
  return parts.map((t) => el("span", { className: "metric" }, t));
}

const ROLLOUT_STATES = { running: "canary", promoted: "promoted", rolled_back: "rolled back" };

function rolloutText(r) {
  if (!r) return null;
  const figures = r.mae === null ? "" : `: MAE ${fmt(r.mae, 4)} vs ${fmt(r.stable_mae, 4)} on ${r.outcomes}`;
  const share = r.state === "running" ? ` ${r.traffic}%` : "";
  return el("span", { className: "rollout", title: r.reason || "", data: { state: r.state } },
    `${ROLLOUT_STATES[r.state]}${share}${figures}`);
}

function button(label, className, version, onClick) {
  const b = el("button", { type: "button", className, data: { version: String(version) } }, label);
  b.addEventListener("click", () => onClick(b));
  return b;
}

function versionRow(v) {
  const running = v.rollout && v.rollout.state === "running";
  const actions = [];
  if (v.served) actions.push(el("span", { className: "badge" }, "served"));
  else {
    actions.push(button(running ? "Promote" : "Serve", "serve", v.version,
      (b) => serveVersion(v.version, b)));
    if (running) actions.push(button("Roll back", "rollback", v.version, (b) => rollBack(v.version, b)));
    else actions.push(button("Canary 10%", "canary", v.version, (b) => startCanary(v.version, b)));
  }
  return el("tr", { data: { version: String(v.version), served: String(v.served), canary: String(running) } },
    el("td", {}, String(v.version)),
    el("td", {}, fmt(v.w)),
    el("td", {}, v.params.fit_intercept ? fmt(v.b) : "–"),
    el("td", {}, ...metrics(v.metrics)),
    el("td", { className: "quality" }, ...quality(v.quality)),
    el("td", {}, shortId(v.job_id)),
    el("td", {}, when(v.trained_at)),
    el("td", {}, ...actions, rolloutText(v.rollout)));
}

// A canary: 10% of predictions go to the version; a rule may decide later (the API's body).
async function startCanary(version, b) {
  await changeVersions(b, `Rolling version ${version} out to 10%…`, async () => {
    await request("POST", `/models/${encodeURIComponent(version)}/serve`, { traffic: 10 });
    return `Version ${version} gets 10% of predictions now.`;
  });
}

async function rollBack(version, b) {
  await changeVersions(b, `Rolling version ${version} back…`, async () => {
    await request("DELETE", `/models/${encodeURIComponent(version)}/serve`);
    return `Version ${version}'s canary is rolled back.`;
  });
}

async function changeVersions(b, doing, change) {
  b.disabled = true;
  $("versions-status").textContent = doing;
  try {
    $("versions-status").textContent = await change();
  } catch (error) {
    b.disabled = false;
    $("versions-status").textContent = `Refused: ${error.message}`;
  }
  await Promise.all([refreshServed(), refreshVersions()]);
}

// The warm-start choices follow the kept versions; a choice still kept stays chosen.
function initFromChoices(versions) {
  const select = $("init_from");
  const chosen = select.value;
  const fixed = [...select.options].slice(0, 2);
  const kept = versions.map((v) => el("option", { value: String(v.version) },
    `version ${v.version}${v.served ? " (served)" : ""}`));
  select.replaceChildren(...fixed, ...kept);
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
  syncInitW();
}

// A warm start replaces the initial w: the service takes one or the other.
function syncInitW() {
  $("init_w").disabled = $("init_from").value !== "";
}

async function refreshVersions() {
  const ask = ++asked.versions;
  try {
    const list = await request("GET", `/models?limit=${VERSIONS_SHOWN}`);
    if (ask !== asked.versions) return;
    const rows = list.versions.map(versionRow);
    if (rows.length === 0) rows.push(el("tr", {}, el("td", { colSpan: 8 }, "No versions yet.")));
    $("versions").tBodies[0].replaceChildren(...rows);
    $("versions").dataset.servedVersion = String(list.served_version ?? "");
    initFromChoices(list.versions);
  } catch (error) {
    if (ask !== asked.versions) return;
    $("versions-status").textContent = `The versions are unknown: ${error.message}`;
  }
}

async function serveVersion(version, button) {
  button.disabled = true;
  $("versions-status").textContent = `Serving version ${version}…`;
  try {
    const model = await request("POST", `/models/${encodeURIComponent(version)}/serve`);
    $("versions-status").textContent = `Version ${model.version} is served now.`;
  } catch (error) {
    button.disabled = false;
    $("versions-status").textContent = `Serving version ${version} was refused: ${error.message}`;
  }
  await Promise.all([refreshServed(), refreshVersions()]);
}

function paramsText(p) {
  const parts = [`lr ${fmt(p.learning_rate)}`, `batch ${p.batch_size ?? "all"}`];
  if (p.fit_intercept) parts.push("with b");
  if (p.validation_fraction) parts.push(`held out ${fmt(p.validation_fraction)}`);
  if (p.tol !== null && p.tol !== undefined) parts.push(`tol ${fmt(p.tol)}`);
  if (p.publish && p.publish !== "always") parts.push(`publish ${p.publish}`);
  if (p.init_from !== null && p.init_from !== undefined) parts.push(`from v${p.init_from}`);
  parts.push(`seed ${p.seed}`);
  return parts.join(" · ");
}

function jobRow(job) {
  let result = "";
  if (job.result) {
    const unserved = job.result.published === false ? " (not served)" : "";
    result = `v${job.result.model_version}: w = ${fmt(job.result.w)}${unserved}`;
  } else if (job.error) {
    result = job.error.title;
  }
  return el("tr", { data: { jobId: job.id, status: job.status } },
    el("td", {}, shortId(job.id)),
    el("td", {}, job.status),
    el("td", {}, `${job.progress.epoch} / ${job.progress.epochs}`),
    el("td", {}, paramsText(job.params)),
    el("td", {}, result),
    el("td", {}, when(job.created_at)));
}

async function refreshJobs() {
  const ask = ++asked.jobs;
  try {
    const { jobs } = await request("GET", `/jobs?limit=${JOBS_SHOWN}`);
    if (ask !== asked.jobs) return jobs;
    const rows = jobs.map(jobRow);
    if (rows.length === 0) rows.push(el("tr", {}, el("td", { colSpan: 6 }, "No jobs yet.")));
    $("jobs").tBodies[0].replaceChildren(...rows);
    $("jobs-status").textContent = "";
    return jobs;
  } catch (error) {
    if (ask === asked.jobs) $("jobs-status").textContent = `The jobs are unknown: ${error.message}`;
    return null;
  }
}

function refreshAll() {
  return Promise.all([refreshServed(), refreshVersions(), refreshJobs()]);
}

// As the page opens: the latest job, live if it still runs, else its history and outcome.
async function showLatest(job) {
  Object.assign(live, { jobId: job.id, epochs: job.params.epochs, restreams: 0 });
  resetSeries();
  $("live-epochs").textContent = String(job.params.epochs);
  $("fit-status").textContent = `Job ${job.id}: ${job.status}.`;
  if (!ENDED.includes(job.status)) {
    setRunning(true);
    watch(job.id);
    return;
  }
  try {
    const query = `job_id=${encodeURIComponent(job.id)}&max_points=${CHART_POINTS}`;
    const h = await request("GET", `/history?${query}`);
    if (live.fitted) return; // a fit started meanwhile
    Object.assign(live, { epoch: h.epoch, w: h.w, b: h.b, loss: h.loss });
    live.valLoss = h.val_loss || null;
    if (h.epoch.length > 0) {
      $("live-w").textContent = fmt(h.w[h.w.length - 1]);
      $("live-loss").textContent = fmt(h.loss[h.loss.length - 1], 4);
    }
  } catch (error) {
    // a job cancelled before it started has no history: its outcome says enough
  }
  if (live.fitted) return;
  showOutcome(job);
  redraw();
}

async function openPage() {
  const [, , jobs] = await refreshAll();
  if (live.fitted) return; // the user started a fit meanwhile
  if (jobs && jobs.length > 0) {
    await showLatest(jobs[0]);
  } else if ($("served").dataset.version === "" && jobs) {
    $("fit-status").textContent = "No fit yet.";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("fit-form").addEventListener("submit", startFit);
  $("cancel-button").addEventListener("click", cancelFit);
  $("predict-form").addEventListener("submit", predict);
  $("log-scale").addEventListener("change", redraw);
  $("init_from").addEventListener("change", syncInitW);
  $("coverage").addEventListener("change", syncMethod);
  syncMethod(); // a reload may keep a chosen coverage
  redraw();
  openPage();
});

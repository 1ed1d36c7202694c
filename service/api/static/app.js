// The MMAudio page: submits a job, follows its server-sent events, plays and lists results.
// Plain browser JavaScript, no build step. The event stream is read with fetch() rather than EventSource,
// because EventSource cannot send the Authorization header that API keys need.
"use strict";

const KEY_STORAGE = "mmaudio-api-key";
const RETRY_MS = 2000;  // until the stream's own `retry:` says otherwise
const STAGES = {
  queued: "Queued",
  starting: "Starting",
  video: "Reading the video",
  features: "Encoding the conditions",
  sampling: "Sampling",
  decoding: "Decoding audio",
  encoding: "Writing the result",
  done: "Done",
};

const $ = (id) => document.getElementById(id);
let info = null;
let following = null;  // AbortController of the event stream being read
let blobUrls = [];  // object URLs of the shown results (with API keys), revoked when another job is shown
let resultShown = null;  // id of the job whose result is on the page

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

async function problemOf(response) {
  try {
    const body = await response.json();
    if (body && body.title) return body;
  } catch (err) { /* not JSON */ }
  return { title: `HTTP ${response.status}`, detail: response.statusText };
}

function showProblem(box, problem) {
  box.hidden = !problem;
  if (!problem) return;
  box.querySelector(".problem-title").textContent = problem.title;
  box.querySelector(".problem-detail").textContent = problem.detail || "";
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) throw await problemOf(response);
  return response;
}

// --- the form ---------------------------------------------------------------------------------------------

function kind() {
  return document.querySelector("input[name=kind]:checked").value;
}

function syncKind() {
  const current = kind();
  $("file-row").hidden = current === "text";
  $("file").accept = current === "video" ? "video/*" : "image/*";
  $("whole-row").hidden = current !== "video";
  if (current !== "video") $("whole-video").checked = false;
  $("duration").disabled = $("whole-video").checked;
  for (const option of $("format").options) {
    if (option.value === "mp4") option.disabled = current !== "video";
  }
  if ($("format").selectedOptions[0]?.disabled) $("format").value = "";
}

function jobParameters() {
  const params = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    duration: $("whole-video").checked ? "video" : Number($("duration").value),
    num_steps: Number($("steps").value),
    cfg_strength: Number($("cfg").value),
    num_samples: Number($("num-samples").value),
    variant: $("variant").value,
  };
  if ($("seed").value !== "") params.seed = Number($("seed").value);
  if ($("format").value) params.output_format = $("format").value;
  if ($("sample-rate").value) params.sample_rate = Number($("sample-rate").value);
  return params;
}

async function submit(event) {
  event.preventDefault();
  showProblem($("problem"), null);
  const params = jobParameters();
  let body;
  let headers = {};
  if (kind() === "text") {
    body = JSON.stringify(params);
    headers = { "Content-Type": "application/json" };
  } else {
    const file = $("file").files[0];
    if (!file) {
      showProblem($("problem"), { title: "Choose a file", detail: `Pick the ${kind()} to generate audio for.` });
      return;
    }
    body = new FormData();
    body.append(kind(), file, file.name);
    for (const [name, value] of Object.entries(params)) body.append(name, String(value));
  }
  $("submit").disabled = true;
  try {
    const response = await api("/v1/jobs", { method: "POST", body, headers });
    const job = await response.json();
    showJob(job);
    refreshJobs();
  } catch (problem) {
    showProblem($("problem"), problem.title ? problem : { title: "Network error", detail: String(problem) });
  } finally {
    $("submit").disabled = false;
  }
}

// --- one job ----------------------------------------------------------------------------------------------

function progressOf(job) {
  const progress = job.progress || {};
  if (job.status === "queued") {
    const position = job.queue_position ? `position ${job.queue_position}` : "waiting for a worker";
    return { share: 0, text: `Queued, ${position}` };
  }
  if (job.status !== "running") return { share: job.status === "succeeded" ? 1 : 0, text: "" };
  const stage = STAGES[progress.stage] || progress.stage || "Running";
  if (progress.stage === "sampling" && progress.steps) {
    const windows = progress.windows || 1;
    const window = progress.window || 1;
    const done = (window - 1) * progress.steps + (progress.step || 0);
    const where = windows > 1 ? `, window ${window}/${windows}` : "";
    return { share: done / (windows * progress.steps), text: `${stage}: step ${progress.step}/${progress.steps}${where}` };
  }
  return { share: progress.fraction || 0, text: `${stage} ${Math.round(100 * (progress.fraction || 0))}%` };
}

function seconds(value) {
  return typeof value === "number" ? `${value.toFixed(2)} s` : String(value);
}

function timingRows(timings, prefix = "") {
  const rows = [];
  for (const [name, value] of Object.entries(timings || {})) {
    if (value && typeof value === "object") rows.push(...timingRows(value, `${prefix}${name} `));
    else rows.push([`${prefix}${name}`, name === "batch_size" || typeof value !== "number" ? String(value) : seconds(value)]);
  }
  return rows;
}

function renderDetails(job) {
  const rows = [
    ["seed", String(job.params.seed)],
    ["variant", job.model.variant],
    ["weights", job.model.weights.kind],
    ["steps", String(job.params.num_steps)],
    ["cfg", String(job.params.cfg_strength)],
  ];
  if (job.result) rows.push(["audio", `${seconds(job.result.duration)} at ${job.result.sample_rate} Hz`]);
  const windows = job.result && job.result.windows;
  if (windows) rows.push(["windows", `${windows.count}, ${seconds(windows.overlap_seconds)} overlap, ${windows.schedule}`]);
  rows.push(...timingRows(job.timings).map(([name, value]) => [`time ${name}`, value]));
  $("details").replaceChildren(...rows.flatMap(([name, value]) => [element("dt", { textContent: name }),
    element("dd", { textContent: value, className: `detail-${name.replaceAll(" ", "-")}` })]));
}

function renderStatus(job) {
  $("job-id").textContent = job.id.slice(0, 8);
  $("job-id").title = job.id;
  $("job-status").textContent = job.cancel_requested && !["canceled", "failed", "succeeded"].includes(job.status)
    ? "canceling" : job.status;
  $("job-status").className = `status ${job.status}`;
  $("random-label").hidden = !job.model.weights.random_weights;
  const { share, text } = progressOf(job);
  $("progress-block").hidden = !["queued", "running"].includes(job.status);
  $("progress-fill").style.width = `${Math.round(100 * share)}%`;
  $("progress-text").textContent = text;
  $("cancel").hidden = !["queued", "running"].includes(job.status) || job.cancel_requested;
  showProblem($("job-problem"), job.error);
  renderDetails(job);
}

async function mediaUrl(href) {
  if (!info.api_keys_required) return href;  // the browser streams it (and seeks with ranges) itself
  const blob = await (await api(href)).blob();
  const url = URL.createObjectURL(blob);
  blobUrls.push(url);
  return url;
}

async function renderResult(job) {
  const result = job.result;
  const primary = job.params.output_format;
  const players = [];
  for (let sample = 0; sample < result.num_samples; sample++) {
    const file = result.files.find((f) => f.sample === sample && f.format === primary);
    const player = element(primary === "mp4" ? "video" : "audio", { controls: true, preload: "metadata" });
    player.dataset.sample = String(sample);
    player.src = await mediaUrl(file.href);
    const caption = result.num_samples > 1 ? element("p", { className: "muted", textContent: `Sample ${sample + 1}` }) : "";
    players.push(element("figure", { className: "player" }, player, caption));
  }
  $("result").replaceChildren(...players);
  const links = result.files.map((file) => {
    const name = `${job.id.slice(0, 8)}-${file.sample}.${file.format}`;
    const link = element("a", { href: file.href, download: name, textContent: result.num_samples > 1 ? `${file.format} #${file.sample + 1}` : file.format });
    if (info.api_keys_required) {
      link.addEventListener("click", async (event) => {
        event.preventDefault();
        const url = await mediaUrl(file.href);
        element("a", { href: url, download: name }).click();
      });
    }
    return link;
  });
  $("downloads").replaceChildren(element("span", { className: "muted", textContent: "Download: " }), ...links);
}

function clearResult() {
  for (const url of blobUrls) URL.revokeObjectURL(url);
  blobUrls = [];
  resultShown = null;
  $("result").replaceChildren();
  $("downloads").replaceChildren();
}

async function render(job) {
  renderStatus(job);
  if (job.status === "succeeded" && resultShown !== job.id) {
    resultShown = job.id;
    try {
      await renderResult(job);
    } catch (problem) {
      showProblem($("job-problem"), problem.title ? problem : { title: "Download failed", detail: String(problem) });
    }
  }
}

function showJob(job) {
  if (following) following.abort();
  clearResult();
  $("job").hidden = false;
  $("job").dataset.id = job.id;
  render(job);
  if (!["succeeded", "failed", "canceled"].includes(job.status)) follow(job.id);
  else refreshJobs();
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
  });
}

// Reads the job's server-sent events; after a dropped connection it reconnects with Last-Event-ID, so only
// newer revisions come (and 204 once the final one was seen).
async function follow(id) {
  const controller = new AbortController();
  following = controller;
  const { signal } = controller;
  let lastId = "";
  let retry = RETRY_MS;
  let ended = false;
  const handle = (block) => {
    let data = "";
    for (const line of block.split(/\r?\n/)) {
      const [field, ...rest] = line.split(":");
      const value = rest.join(":").replace(/^ /, "");
      if (field === "id") lastId = value;
      else if (field === "retry" && /^\d+$/.test(value)) retry = Number(value);
      else if (field === "data") data += data ? `\n${value}` : value;
    }
    if (!data) return;
    const job = JSON.parse(data);
    ended = ["succeeded", "failed", "canceled"].includes(job.status);
    render(job);
  };
  while (!signal.aborted && !ended) {
    try {
      const headers = lastId ? { "Last-Event-ID": lastId } : {};
      const response = await api(`/v1/jobs/${id}/events`, { headers, signal });
      if (response.status === 204) {
        await render(await (await api(`/v1/jobs/${id}`, { signal })).json());
        break;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          handle(buffer.slice(0, cut));
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        }
      }
    } catch (problem) {
      if (signal.aborted) return;
      if (problem.status && problem.status < 500) {  // the job is gone or not ours: retrying will not help
        showProblem($("job-problem"), problem);
        return;
      }
    }
    if (!ended) await sleep(retry, signal);
  }
  if (!signal.aborted) refreshJobs();
}

async function openJob(id) {
  try {
    showJob(await (await api(`/v1/jobs/${id}`)).json());
  } catch (problem) {
    showProblem($("problem"), problem);
  }
}

async function cancel() {
  try {
    render(await (await api(`/v1/jobs/${$("job").dataset.id}/cancel`, { method: "POST" })).json());
  } catch (problem) {
    showProblem($("job-problem"), problem);
  }
}

// --- recent jobs ------------------------------------------------------------------------------------------

async function refreshJobs() {
  const note = $("history-note");
  try {
    const page = await (await api("/v1/jobs?limit=20")).json();
    note.hidden = page.jobs.length > 0;
    note.textContent = "No jobs yet.";
    $("jobs").replaceChildren(...page.jobs.map((job) => {
      const what = job.params.prompt || "(no prompt)";
      const source = job.input.filename || job.input.kind;
      const when = new Date(job.created_at).toLocaleTimeString();
      const item = element("li", { className: "job-item" },
        element("span", { className: `status ${job.status}`, textContent: job.status }),
        element("span", { className: "job-what", textContent: what }),
        element("span", { className: "muted job-meta", textContent: `${source} · ${when}` }));
      item.dataset.id = job.id;
      item.tabIndex = 0;
      item.addEventListener("click", () => openJob(job.id));
      item.addEventListener("keydown", (event) => { if (event.key === "Enter") openJob(job.id); });
      return item;
    }));
  } catch (problem) {
    note.hidden = false;
    note.textContent = problem.title ? `${problem.title}${problem.detail ? `: ${problem.detail}` : ""}` : String(problem);
    $("jobs").replaceChildren();
  }
}

// --- start ------------------------------------------------------------------------------------------------

async function start() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    refreshJobs();
  });
  for (const radio of document.querySelectorAll("input[name=kind]")) radio.addEventListener("change", syncKind);
  $("whole-video").addEventListener("change", syncKind);
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("refresh").addEventListener("click", refreshJobs);
  try {
    info = await (await fetch("/v1/info")).json();
  } catch (err) {
    showProblem($("problem"), { title: "The service does not answer", detail: String(err) });
    return;
  }
  $("key-row").hidden = !info.api_keys_required;
  $("weights-badge").hidden = !info.weights.random_weights;
  $("variant").replaceChildren(...info.variants.map((name) => element("option", { value: name, textContent: name })));
  $("variant").value = info.default_variant;
  $("format").append(...info.formats.map((name) => element("option", { value: name, textContent: name })));
  $("duration").max = String(info.limits.max_duration);
  $("steps").max = String(info.limits.max_num_steps);
  $("num-samples").max = String(info.limits.max_num_samples);
  $("prompt").maxLength = info.limits.max_prompt_chars;
  $("negative-prompt").maxLength = info.limits.max_prompt_chars;
  syncKind();
  document.body.dataset.ready = "true";
  refreshJobs();
}

start();

// The page's only script: it calls the server's own API (the same routes as any client).
"use strict";

const $ = (id) => document.getElementById(id);
let status = null;

function headers(extra) {
  const key = $("key").value.trim();
  return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return (i ? n.toFixed(2) : String(n)) + " " + units[i];
}

function fill(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows.map(([name, value]) => {
    const tr = document.createElement("tr");
    for (const text of [name, value]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  }));
}

async function refresh() {
  try {
    status = await (await api("/v1/status")).json();
  } catch (error) {
    $("model").textContent = "status: " + error.message;
    return;
  }
  $("model").textContent = status.model + " · " + status.pipeline + " (" + status.kind + ")";
  $("frames-field").hidden = status.kind !== "video";
  const takesImage = status.routes.includes("/v1/images/edits") || status.kind === "video";
  $("image-field").hidden = !takesImage;
  $("submit").textContent = status.kind === "video" ? "Generate video" : "Generate";
  const offload = status.offload;
  fill($("stats"), [
    ["queue", status.queue.waiting + " waiting" + (status.queue.running ? ", " + status.queue.running + " running" : "")],
    ["offload", status.offload_mode],
    ["bytes moved", offload ? bytes(offload.bytes_h2d) : "0 B"],
    ["H2D", offload ? offload.h2d_gbps.toFixed(1) + " GB/s" : "-"],
    ["peak allocated", bytes(status.peak_memory.allocated || 0)],
    ["peak reserved", bytes(status.peak_memory.reserved || 0)],
    ["sizes", "multiples of " + status.size_multiple + ", " + status.min_size + " to " + status.max_size],
  ]);
  const plan = status.plans.find((p) => p.current) || status.plans[status.plans.length - 1];
  if (plan) {
    fill($("plan"), [["shape", plan.size + ", " + plan.steps + " steps"],
      ...Object.entries(plan.placement),
      ["predicted step", plan.predicted_step_s == null ? "-" : plan.predicted_step_s.toFixed(3) + " s"]]);
  }
}

function show(element) {
  $("output").replaceChildren(element);
}

function fields() {
  const body = { prompt: $("prompt").value };
  if ($("size").value.trim()) body.size = $("size").value.trim();
  if ($("steps").value) body.num_inference_steps = Number($("steps").value);
  if ($("seed").value) body.seed = Number($("seed").value);
  if (status && status.kind === "video" && $("frames").value) body.num_frames = Number($("frames").value);
  return body;
}

function request(body, file, fileField) {
  if (!file) {
    return { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } };
  }
  const form = new FormData();
  for (const [name, value] of Object.entries(body)) form.append(name, String(value));
  form.append(fileField, file);
  return { method: "POST", body: form };
}

async function makeImage(body, file) {
  const path = file ? "/v1/images/edits" : "/v1/images/generations";
  const answer = await (await api(path, request(body, file, "image"))).json();
  const image = document.createElement("img");
  image.id = "result";
  image.alt = body.prompt;
  image.src = "data:image/" + answer.output_format + ";base64," + answer.data[0].b64_json;
  await image.decode();
  show(image);
}

async function makeVideo(body, file) {
  let job = await (await api("/v1/videos", request(body, file, "input_reference"))).json();
  const bar = $("progress");
  bar.hidden = false;
  while (job.status === "queued" || job.status === "in_progress") {
    bar.value = job.progress;
    $("state").textContent = job.status.replace("_", " ") + ": step " + job.steps_done + " of " + (job.steps_total || "?");
    await new Promise((done) => setTimeout(done, 500));
    job = await (await api("/v1/videos/" + job.id)).json();
  }
  bar.hidden = true;
  if (job.status === "failed") throw new Error(job.error ? job.error.message : "the video job failed");
  const blob = await (await api("/v1/videos/" + job.id + "/content")).blob();
  const video = document.createElement("video");
  video.id = "result";
  Object.assign(video, { controls: true, autoplay: true, loop: true, muted: true });
  video.src = URL.createObjectURL(blob);
  show(video);
}

async function submit(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("submit").disabled = true;
  $("state").textContent = "generating…";
  localStorage.setItem("vramferry-key", $("key").value);
  const started = performance.now();
  try {
    if (!status) await refresh();
    const file = $("image-field").hidden ? null : $("image").files[0] || null;
    await (status && status.kind === "video" ? makeVideo : makeImage)(fields(), file);
    $("state").textContent = "done in " + ((performance.now() - started) / 1000).toFixed(2) + " s";
  } catch (error) {
    $("state").textContent = "";
    $("error").textContent = error.message;
    $("error").hidden = false;
  } finally {
    $("submit").disabled = false;
    refresh();
  }
}

$("key").value = localStorage.getItem("vramferry-key") || "";
$("key").addEventListener("change", refresh);
$("form").addEventListener("submit", submit);
refresh();
setInterval(refresh, 3000);

"""`GET /`: one self-contained page (no CDN, no build step): the model's name and held-out metrics, then
drop or choose one or several photos and see a table of photo + catalog entry (price with its currency,
the time each answer took). With `--api-key` the page asks for the key once and keeps it for the tab."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>productvlm</title>
<style>
  * { box-sizing: border-box; }
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 0 auto; padding: 1.5rem 1rem; color: #222; }
  h1 { margin: 0 0 .25rem; font-size: 1.8rem; line-height: 1.2; }
  #intro { margin: 0 0 1rem; color: #444; }
  #model { margin: 0 0 1rem; padding: .6rem .8rem; background: #f4f6f8; border-radius: 8px; font-size: .95rem; }
  #model ul { display: flex; flex-wrap: wrap; gap: .25rem 1.25rem; margin: .3rem 0 0; padding: 0; list-style: none; }
  #model b { font-weight: 600; }
  #keyform { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; margin: 0 0 1rem; padding: .6rem .8rem;
             border: 1px solid #e0b000; background: #fffbea; border-radius: 8px; }
  #keyform input { flex: 1 1 14rem; padding: .35rem .5rem; font: inherit; }
  #keyform button { padding: .35rem .9rem; font: inherit; }
  #drop { display: block; margin: 0 0 1rem; padding: 2rem 1rem; border: 2px dashed #999; border-radius: 12px;
          text-align: center; cursor: pointer; color: #444; }
  #drop:hover, #drop.over { border-color: #0a7; background: #f2fbf7; }
  #status { min-height: 1.5em; margin: 0 0 1rem; }
  #status.error { color: #b00; }
  .scroll { overflow-x: auto; }
  #results { width: 100%; border-collapse: collapse; }
  #results th, #results td { padding: .5rem; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
  #results th { font-size: .85rem; color: #555; font-weight: 600; white-space: nowrap; }
  #results img { display: block; width: 7rem; height: 7rem; object-fit: contain; background: #fafafa; border-radius: 6px; }
  #results .price, #results .time { white-space: nowrap; font-variant-numeric: tabular-nums; }
  #results .error { color: #b00; }
  #results th:first-child, #results td:first-child { width: 1%; }
  @media (max-width: 40rem) {
    body { padding: 1rem .75rem; }
    #results { font-size: .9rem; }
    #results th, #results td { padding: .4rem .25rem; }
    #results img { width: 4.5rem; height: 4.5rem; }
  }
  details { margin-top: .3rem; font-size: .85rem; color: #555; }
  pre { white-space: pre-wrap; margin: .3rem 0 0; background: #f6f6f6; padding: .4rem; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<h1>productvlm</h1>
<p id="intro">Drop product photos (or choose them) to get their catalog entries: title, category and price.</p>
<section id="model" aria-label="Model">Model: <b id="model-name">&hellip;</b>
  <span id="model-eval"></span>
  <ul id="model-metrics"></ul>
</section>
<form id="keyform" hidden>
  <label for="key">This server needs an API key:</label>
  <input id="key" type="password" autocomplete="off" placeholder="API key">
  <button type="submit">Use key</button>
</form>
<label id="drop">Drop photos here, or click to choose one or several
  <input id="file" type="file" accept="image/*" multiple hidden>
</label>
<p id="status" role="status"></p>
<div class="scroll">
<table id="results" hidden>
  <thead><tr><th>Photo</th><th>Title</th><th>Category</th><th id="price-head">Price</th><th>Time</th></tr></thead>
  <tbody></tbody>
</table>
</div>
<script>
const $ = (id) => document.getElementById(id);
const show = (v) => (v === null || v === undefined || v === "" ? "\\u2014" : String(v));
const KEY = "productvlm-api-key";
let currency = null;

function headers() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: "Bearer " + key } : {};
}

function askForKey(message) {
  $("keyform").hidden = false;
  $("key").focus();
  setStatus(message, true);
}

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function formatPrice(price) {
  if (price === null || price === undefined) return show(null);
  if (currency) {
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(price);
    } catch (e) {
      return price.toFixed(2) + " " + currency;  // not an ISO 4217 code: show it as written
    }
  }
  return price.toFixed(2);
}

function formatMetric(m) {  // chrF is a 0-100 score; the others are fractions
  return m.type === "chrf" ? m.value.toFixed(1) : (100 * m.value).toFixed(1) + "%";
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    const had = sessionStorage.getItem(KEY);
    sessionStorage.removeItem(KEY);
    $("model-name").textContent = "\\u2014";
    $("model-eval").textContent = "(shown once the API key is entered)";
    askForKey(had ? "That API key was refused; enter the right one." : "Enter the API key to use this server.");
    return false;
  }
  const model = (await r.json()).data[0];
  const info = model.productvlm || {};
  $("model-name").textContent = model.id;
  currency = info.currency || null;
  $("price-head").textContent = currency ? "Price (" + currency + ")" : "Price (currency not recorded)";
  const ev = info.evaluation;
  $("model-eval").textContent = ev
    ? "\\u00b7 held-out " + ev.split + " split" + (ev.n ? ", " + ev.n + " photos" : "") + ":"
    : "\\u00b7 not evaluated yet (run productvlm eval to see its held-out metrics here)";
  $("model-metrics").replaceChildren(...(ev ? ev.metrics : []).map((m) => {
    const li = document.createElement("li");
    li.textContent = m.name + " " + formatMetric(m);
    return li;
  }));
  $("keyform").hidden = true;
  return true;
}

function addRow(file) {
  const row = document.createElement("tr");
  row.innerHTML = '<td><img alt=""></td><td class="title">\\u2026</td><td class="category"></td>' +
    '<td class="price"></td><td class="time"></td>';
  const img = row.querySelector("img");
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  $("results").tBodies[0].prepend(row);
  $("results").hidden = false;
  return row;
}

function fill(row, data, seconds) {
  const cell = (name) => row.querySelector("." + name);
  cell("title").textContent = show(data.title);
  const raw = document.createElement("details");
  raw.innerHTML = "<summary>raw answer</summary><pre></pre>";
  raw.querySelector("pre").textContent = data.raw;
  cell("title").append(raw);
  cell("category").textContent = show(data.category);
  cell("price").textContent = formatPrice(data.price);
  cell("time").textContent = seconds.toFixed(2) + " s";
}

async function catalog(file, row) {
  const body = new FormData();
  body.append("file", file, file.name);
  const start = performance.now();
  const r = await fetch("/v1/catalog", { method: "POST", body, headers: headers() });
  const data = await r.json();
  if (r.status === 401) {
    sessionStorage.removeItem(KEY);
    askForKey("The server asks for an API key; enter it and drop the photos again.");
  }
  if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
  fill(row, data, (performance.now() - start) / 1000);
}

async function send(files) {
  files = [...files].filter((f) => f.type.startsWith("image/") || !f.type);
  if (!files.length) return setStatus("Those are not photos.", true);
  setStatus("Reading " + files.length + (files.length > 1 ? " photos\\u2026" : " photo\\u2026"), false);
  const start = performance.now();
  const results = await Promise.allSettled(files.map((f) => {
    const row = addRow(f);
    return catalog(f, row).catch((e) => {
      row.querySelector(".title").textContent = "Error: " + e.message;
      row.querySelector(".title").className = "title error";
      throw e;
    });
  }));
  const failed = results.filter((r) => r.status === "rejected").length;
  const took = ((performance.now() - start) / 1000).toFixed(2);
  if (failed) setStatus(failed + " of " + files.length + " failed (" + took + " s).", true);
  else setStatus("Done: " + files.length + (files.length > 1 ? " photos" : " photo") + " in " + took + " s.", false);
}

$("keyform").addEventListener("submit", async (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  if (await loadModel()) setStatus("Key accepted.", false);
});
$("file").addEventListener("change", (e) => { if (e.target.files.length) send(e.target.files); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files);
});
loadModel().catch((e) => setStatus("Could not reach the server: " + e.message, true));
</script>
</body>
</html>
"""

"""`GET /`: one self-contained page (no CDN, no build step) to drop or choose a photo and see its entry."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>productvlm</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  #drop { border: 2px dashed #999; border-radius: 12px; padding: 2rem; text-align: center; cursor: pointer; }
  #drop.over { border-color: #0a7; background: #f2fbf7; }
  #preview { max-width: 100%; max-height: 18rem; display: none; margin: 1rem auto; border-radius: 8px; }
  dl { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; }
  dt { font-weight: 600; } pre { white-space: pre-wrap; background: #f6f6f6; padding: .5rem; }
  #status.error { color: #b00; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<h1>productvlm</h1>
<p>Drop a product photo (or choose one) to get its catalog entry.</p>
<label id="drop">Drop a photo here, or click to choose one
  <input id="file" type="file" accept="image/*" hidden>
</label>
<img id="preview" alt="the photo sent">
<p id="status" role="status"></p>
<dl id="result" hidden>
  <dt>Title</dt><dd id="title"></dd>
  <dt>Category</dt><dd id="category"></dd>
  <dt>Price</dt><dd id="price"></dd>
  <dt>Raw answer</dt><dd><pre id="raw"></pre></dd>
</dl>
<script>
const $ = (id) => document.getElementById(id);
const show = (v) => (v === null || v === undefined ? "\\u2014" : String(v));

async function send(file) {
  $("preview").src = URL.createObjectURL(file);
  $("preview").style.display = "block";
  $("result").hidden = true;
  $("status").className = "";
  $("status").textContent = "Reading the photo\\u2026";
  const body = new FormData();
  body.append("file", file, file.name);
  try {
    const r = await fetch("/v1/catalog", { method: "POST", body });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
    $("title").textContent = show(data.title);
    $("category").textContent = show(data.category);
    $("price").textContent = data.price === null ? show(null) : data.price.toFixed(2);
    $("raw").textContent = data.raw;
    $("result").hidden = false;
    $("status").textContent = "Done.";
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = "Error: " + e.message;
  }
}

$("file").addEventListener("change", (e) => e.target.files.length && send(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""

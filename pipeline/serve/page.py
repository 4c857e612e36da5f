"""The page at ``/``: choose a photo, see it beside its top-5 candidates (thumbnails by image_id
of the answering state, scores) and the database positions as a plot with the estimate marked.
Plain HTML, JavaScript and SVG: no map tiles, nothing fetched from elsewhere, so it works offline.
A bearer token, when the service wants one, is typed into the page and sent with each request."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Where was this photo taken?</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
#row{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}
#query img{max-width:360px;border:3px solid #333}
.cand{display:inline-block;margin:0 .6em .6em 0;text-align:center;font-size:.85em}
.cand img{width:180px;height:auto;display:block;border:3px solid #ccc}
.cand.top img{border-color:#d22}
#plot{border:1px solid #aaa;background:#fafafa}
#status{color:#555;margin:.5em 0}
#status.error{color:#b00}
</style></head><body>
<h1>Where was this photo taken?</h1>
<p><input type="file" id="photo" accept="image/jpeg,image/png">
 candidates <input type="number" id="k" min="1" value="10" style="width:4em">
 reranker <select id="reranker"><option>auto</option><option>ransac</option><option>r2former</option><option>none</option></select>
 token <input type="password" id="token" placeholder="(if required)" style="width:8em"></p>
<div id="status">choose a photo</div>
<div id="row">
 <div id="query"></div>
 <div><div id="top1" data-image-id="" data-state=""></div><div id="cands"></div></div>
 <svg id="plot" width="420" height="420" viewBox="0 0 420 420"></svg>
</div>
<script>
const $ = id => document.getElementById(id);
function headers(extra) {
  const h = Object.assign({}, extra || {}); const t = $('token').value;
  if (t) h['Authorization'] = 'Bearer ' + t; return h;
}
async function thumb(id, version) {
  const r = await fetch('thumbnail/' + id + '?index_version=' + encodeURIComponent(version), {headers: headers()});
  return r.ok ? URL.createObjectURL(await r.blob()) : '';
}
function plot(points, answer) {
  const svg = $('plot'); svg.innerHTML = '';
  const all = points.concat(answer.candidates.filter(c => c.utm_east !== null).map(c => [c.utm_east, c.utm_north]));
  if (!all.length) return;
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const span = Math.max(x1 - x0, y1 - y0, 1e-9), pad = 20, s = (420 - 2 * pad) / span;
  const X = x => pad + (x - x0) * s, Y = y => 420 - pad - (y - y0) * s;
  const ns = 'http://www.w3.org/2000/svg';
  const dot = (x, y, r, fill, cls) => { const c = document.createElementNS(ns, 'circle');
    c.setAttribute('cx', X(x)); c.setAttribute('cy', Y(y)); c.setAttribute('r', r);
    c.setAttribute('fill', fill); if (cls) c.setAttribute('class', cls); svg.appendChild(c); };
  points.forEach(p => dot(p[0], p[1], 2, '#9ab'));
  answer.candidates.slice(0, 5).forEach(c => { if (c.utm_east !== null) dot(c.utm_east, c.utm_north, 5, '#f90', 'candidate'); });
  const e = answer.estimate;
  if (e.utm_east !== null) dot(e.utm_east, e.utm_north, 8, '#d22', 'estimate');
}
$('photo').addEventListener('change', async () => {
  const file = $('photo').files[0]; if (!file) return;
  $('status').className = ''; $('status').textContent = 'localizing ' + file.name + ' ...';
  $('query').innerHTML = ''; const img = document.createElement('img');
  img.src = URL.createObjectURL(file); $('query').appendChild(img);
  try {
    const q = 'localize?candidates=' + encodeURIComponent($('k').value) + '&reranker=' + encodeURIComponent($('reranker').value);
    const r = await fetch(q, {method: 'POST', body: file, headers: headers({'Content-Type': file.type || 'image/jpeg'})});
    // image ids are 64-bit: JavaScript numbers would round them, so take them from the text
    const text = await r.text(), answer = JSON.parse(text);
    const ids = Array.from(text.matchAll(/"image_id":\s*(\d+)/g), m => m[1]);
    if (!r.ok) throw new Error(r.status + ': ' + (answer.detail || JSON.stringify(answer)));
    const v = answer.state.index_version, cands = $('cands'); cands.innerHTML = '';
    for (const [i, c] of answer.candidates.slice(0, 5).entries()) {
      const d = document.createElement('div'); d.className = 'cand' + (c.rank === 1 ? ' top' : '');
      d.dataset.imageId = ids[i]; const t = document.createElement('img'); t.src = await thumb(ids[i], v);
      d.appendChild(t); const s = c.rerank_score === null ? '' : ' rerank ' + c.rerank_score.toFixed(3);
      d.appendChild(document.createTextNode('#' + c.rank + ' ' + c.path.split('/').pop() + ' global ' + c.global_score.toFixed(3) + s));
      cands.appendChild(d);
    }
    const top = answer.candidates[0];
    $('top1').dataset.imageId = top ? ids[0] : ''; $('top1').dataset.state = v;
    $('top1').textContent = top ? ('top-1: ' + top.path.split('/').pop() + ' at (' + top.utm_east + ', ' + top.utm_north
      + '), confidence ' + answer.estimate.confidence + ' (' + answer.estimate.confidence_kind + ')') : 'no candidates';
    const pos = await (await fetch('positions?index_version=' + encodeURIComponent(v), {headers: headers()})).json();
    plot(pos.positions || [], answer);
    $('status').textContent = 'answered from index ' + v + ', store generation ' + answer.state.store_generation
      + ' in ' + Math.round(answer.timings.total_ms) + ' ms';
  } catch (err) { $('status').className = 'error'; $('status').textContent = String(err.message || err); }
});
</script></body></html>
"""

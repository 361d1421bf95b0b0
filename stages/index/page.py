"""The search page served by stages/index/serve.py: a query box, a picture upload and one result
grid per served index, side by side (e.g. baseline and MCIP over the same images).

Every text from the collection (captions, alt text, keys, urls) reaches the page through
`textContent` or an attribute, never as HTML; the script is its own file (`/app.js`), so the page's
Content-Security-Policy allows no inline script at all. Clicking a result searches by its key.
"""

HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MCIP search</title><link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f6;color:#222}
header{position:sticky;top:0;background:#fff;padding:10px 16px;border-bottom:1px solid #ddd;
 display:flex;gap:10px;align-items:center;flex-wrap:wrap;z-index:1}
#q{flex:1;min-width:240px;font-size:16px;padding:6px 8px}
#status{font-size:13px;color:#555;width:100%}
#status.error{color:#b00020}
#query{display:flex;align-items:center;gap:8px;font-size:13px}
#query img{height:48px;border:1px solid #ccc}
#panes{display:flex;gap:16px;padding:16px;align-items:flex-start}
.pane{flex:1;min-width:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.pane h2{font-size:16px;margin:4px 0 8px}
.pane .about{font-size:12px;color:#666;font-weight:normal}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:8px}
.hit{cursor:pointer;border:1px solid #e2e2e2;border-radius:4px;padding:4px;font-size:12px;
 overflow-wrap:anywhere;background:#fafafa}
.hit:hover{border-color:#4a6cf7}
.hit img{width:100%;aspect-ratio:1;object-fit:contain;background:#eee;display:block}
.score{font-weight:600}
.key{color:#777}
</style></head>
<body>
<header>
 <input id="q" type="search" placeholder="describe a picture, e.g. a red circle on a white background"
  autocomplete="off">
 <label>k <select id="k"><option>10</option><option selected>20</option><option>50</option></select></label>
 <label>or a picture <input id="upload" type="file" accept="image/*"></label>
 <div id="query"></div>
 <div id="status">type a caption, upload a picture, or click a result</div>
</header>
<main id="panes"></main>
<script src="/app.js"></script>
</body></html>
"""

SCRIPT = r"""
'use strict';
const state = {indexes: [], seq: 0};
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function status(text, isError) {
  $('status').textContent = text;
  $('status').className = isError ? 'error' : '';
}

async function loadIndexes() {
  const answer = await fetch('/api/indexes');
  state.indexes = (await answer.json()).indexes;
  const panes = $('panes');
  panes.replaceChildren();
  for (const index of state.indexes) {
    const pane = el('section', 'pane');
    pane.dataset.index = index.name;
    const title = el('h2', null, index.name + ' ');
    const recall = index.kind === 'exact' ? 'exact' : index.kind + ', recall@' + index.k + ' ' +
      index.recall_at_k.toFixed(3);
    title.appendChild(el('span', 'about', '(' + index.rows + ' images, ' + recall + ')'));
    pane.appendChild(title);
    pane.appendChild(el('div', 'grid'));
    panes.appendChild(pane);
  }
}

function showQuery(kind, value) {
  const box = $('query');
  box.replaceChildren();
  box.dataset.kind = kind;
  if (kind === 'key') {
    const img = el('img');
    img.src = '/api/picture/' + encodeURIComponent(value);
    img.alt = 'query picture';
    box.appendChild(img);
    box.appendChild(el('span', null, 'pictures like ' + value));
  } else if (kind === 'image') {
    box.appendChild(el('span', null, 'pictures like the uploaded one'));
  }
}

function render(results) {
  for (const pane of document.querySelectorAll('.pane')) {
    const grid = pane.querySelector('.grid');
    grid.replaceChildren();
    for (const hit of results[pane.dataset.index] || []) {
      const card = el('div', 'hit');
      card.dataset.key = hit.key;
      card.dataset.score = hit.score;
      const img = el('img');
      img.src = '/api/picture/' + encodeURIComponent(hit.key);
      img.alt = hit.caption || hit.alt || hit.key;
      img.loading = 'lazy';
      card.appendChild(img);
      card.appendChild(el('div', 'score', hit.score.toFixed(3)));
      card.appendChild(el('div', 'caption', hit.caption || hit.alt || ''));
      card.appendChild(el('div', 'key', hit.key));
      card.addEventListener('click', () => searchBy({key: hit.key}));
      grid.appendChild(card);
    }
  }
}

async function answer(response, seq) {
  const body = await response.json()
    .catch(() => ({error: 'the server sent no JSON (' + response.status + ')'}));
  if (seq !== state.seq) return;  // a newer query was sent meanwhile
  if (!response.ok) { status(body.error || ('error ' + response.status), true); return; }
  render(body.results);
  const counts = Object.entries(body.results).map(([n, r]) => n + ': ' + r.length).join(', ');
  status('results (' + counts + ') in ' + body.seconds.toFixed(3) + ' s', false);
}

async function searchBy(query) {
  const seq = ++state.seq;
  const k = $('k').value;
  if (query.key !== undefined) showQuery('key', query.key);
  else showQuery('text', query.text);
  const params = new URLSearchParams(Object.assign({k: k}, query));
  status('searching...', false);
  try { await answer(await fetch('/api/search?' + params), seq); }
  catch (err) { status('search failed: ' + err, true); }
}

async function upload(file) {
  const seq = ++state.seq;
  showQuery('image');
  status('searching by the uploaded picture...', false);
  try {
    const response = await fetch('/api/search/image?k=' + $('k').value,
      {method: 'POST', body: file, headers: {'Content-Type': 'application/octet-stream'}});
    await answer(response, seq);
  } catch (err) { status('upload failed: ' + err, true); }
}

let timer = null;
$('q').addEventListener('input', () => {
  clearTimeout(timer);
  const text = $('q').value.trim();
  if (text) timer = setTimeout(() => searchBy({text: text}), 250);
});
$('q').addEventListener('keydown', (e) => {
  if (e.key !== 'Enter' || !$('q').value.trim()) return;
  clearTimeout(timer);
  searchBy({text: $('q').value.trim()});
});
$('upload').addEventListener('change', () => { if ($('upload').files.length) upload($('upload').files[0]); });
loadIndexes().catch((err) => status('cannot list the indexes: ' + err, true));
"""

// Runs the page's script (elise/serve/static/index.html) in node against a live server, with a tiny
// fake DOM, then calls one of its functions and prints the elements' state as JSON.
// usage: node page_harness.js <index.html> <base url> <json: {element id: value}> <function name>
const fs = require("fs");
const [html, base, values, fn] = [fs.readFileSync(process.argv[2], "utf8"), process.argv[3],
                                  JSON.parse(process.argv[4]), process.argv[5]];
const els = {};
const el = (id) => els[id] || (els[id] = {
  id, value: "", textContent: "", innerHTML: "", src: "", disabled: false, files: [], rows: [],
  addEventListener() {}, appendChild() {},
  insertRow() { const r = { cells: [], insertCell() { const c = {}; r.cells.push(c); return c; } }; this.rows.push(r); return r; },
  get firstChild() { return this; },
});
global.document = { getElementById: el, createElement: () => ({}) };
const blobs = [];
URL.createObjectURL = (blob) => { blobs.push(blob); return "blob:" + (blobs.length - 1); };
const realFetch = fetch;
global.fetch = (url, opts) => realFetch(base + url, opts);
const script = html.slice(html.indexOf("<script>") + 8, html.indexOf("</script>"));
// the page's functions are top-level declarations of its script: return the one asked for
const page = new Function("el", script + `\nreturn { ${fn} };`)(el);
for (const [id, v] of Object.entries(values)) el(id).value = v;
page[fn]().then(async () => {
  const out = {};
  for (const [id, e] of Object.entries(els)) {
    out[id] = { value: e.value, text: e.textContent, src: e.src, rows: e.rows.map((r) => r.cells.map((c) => c.textContent)) };
  }
  out.blobs = await Promise.all(blobs.map(async (b) => Buffer.from(await b.arrayBuffer()).toString("base64")));
  console.log(JSON.stringify(out));
});

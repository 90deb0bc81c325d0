// Review page: selection (click, shift-click, drag), edits posted as JSON with the CSRF token.
// Names are only ever set with textContent / value, never parsed as HTML.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const pageSize = Number(document.querySelector('meta[name="page-size"]').content);
  const status = document.getElementById("status");
  const count = document.getElementById("count");
  let anchor = null;   // last clicked image, for shift-click ranges
  let dragging = null; // true while dragging to select, false while dragging to deselect

  function say(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function selected() {
    return Array.from(document.querySelectorAll(".thumbs img.sel")).map((img) => img.dataset.layer);
  }

  function tickedClusters() {
    return Array.from(document.querySelectorAll("section.cluster input.pick:checked")).map(
      (box) => Number(box.closest("section").dataset.id));
  }

  function updateCount() {
    count.textContent = selected().length + " images selected";
  }

  function setSel(img, on) {
    img.classList.toggle("sel", on);
  }

  async function send(edit) {
    const res = await fetch("/api/edits", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      credentials: "same-origin",
      body: JSON.stringify(edit),
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) say((data && (data.detail || data.error)) || ("refused: " + res.status), true);
    return res.ok;
  }

  // One or more edits, then a reload that shows the clusters as they now are.
  async function post(...edits) {
    say("saving…");
    for (const edit of edits) {
      if (!(await send(edit))) return false;
    }
    sessionStorage.setItem("yokai-scroll", String(window.scrollY));
    window.location.reload();
    return true;
  }

  const actions = {
    merge() {
      const ids = tickedClusters();
      if (ids.length < 2) return say("tick two or more clusters to merge", true);
      return post({op: "merge", clusters: ids, into: ids[0]});
    },
    split() {
      const layers = selected();
      if (!layers.length) return say("select images to split off", true);
      return post({op: "split", layers: layers});
    },
    move() {
      const layers = selected();
      if (!layers.length) return say("select images to move", true);
      return post({op: "move", layers: layers, to: Number(document.getElementById("move-target").value)});
    },
    exclude() {
      const layers = selected();
      if (!layers.length) return say("select images to exclude", true);
      return post({op: "exclude_images", layers: layers});
    },
    undo() {
      return post({op: "undo"});
    },
  };
  for (const name of Object.keys(actions)) {
    document.getElementById(name).addEventListener("click", () => actions[name]());
  }

  function initial(select) {
    const opt = Array.from(select.options).find((o) => o.defaultSelected);
    return opt ? opt.value : select.options[0].value;
  }

  // Only what changed is logged, so saving a name does not pin the tier the analysis computed.
  async function saveProps(section) {
    const f = section.querySelector("form.props").elements;
    const id = Number(section.dataset.id);
    const edits = [];
    if (f.name.value !== f.name.defaultValue || f.trigger.value !== f.trigger.defaultValue ||
        f.type.value !== initial(f.type)) {
      edits.push({op: "name", clusters: [id], name: f.name.value.trim(), trigger: f.trigger.value.trim(),
                  type: f.type.value});
    }
    if (f.tier.value !== initial(f.tier)) edits.push({op: "tier", clusters: [id], tier: f.tier.value});
    if (f.train.checked !== f.train.defaultChecked) edits.push({op: "train", clusters: [id], train: f.train.checked});
    if (!edits.length) return say("nothing changed");
    return post(...edits);
  }

  function thumb(layer) {
    const img = document.createElement("img");
    img.loading = "lazy";
    img.src = "/img/" + encodeURIComponent(layer);
    img.dataset.layer = layer;
    img.title = layer;
    img.alt = "";
    img.draggable = false;
    return img;
  }

  async function more(section, button) {
    const grid = section.querySelector(".thumbs");
    const shown = grid.querySelectorAll("img").length;
    const res = await fetch(`/api/clusters/${section.dataset.id}/members?offset=${shown}&limit=${pageSize}`,
      {credentials: "same-origin"});
    if (!res.ok) return say("could not load more images: " + res.status, true);
    const page = await res.json();
    for (const layer of page.layers) grid.appendChild(thumb(layer));
    const left = page.total - grid.querySelectorAll("img").length;
    if (left <= 0) button.remove(); else button.textContent = `Show more (${left} left)`;
    return undefined;
  }

  document.addEventListener("click", (ev) => {
    const section = ev.target.closest("section.cluster");
    if (!section) return;
    if (ev.target.matches("button.save")) saveProps(section);
    else if (ev.target.matches("button.drop")) post({op: "exclude_cluster", clusters: [Number(section.dataset.id)]});
    else if (ev.target.matches("button.more")) more(section, ev.target);
  });

  // Selection: mousedown on an image toggles it and starts a drag; shift-click selects a range.
  document.addEventListener("mousedown", (ev) => {
    const img = ev.target.closest(".thumbs img");
    if (!img || ev.button !== 0) return;
    ev.preventDefault();
    if (ev.shiftKey && anchor && anchor.parentNode === img.parentNode) {
      const all = Array.from(img.parentNode.querySelectorAll("img"));
      const [a, b] = [all.indexOf(anchor), all.indexOf(img)].sort((x, y) => x - y);
      all.slice(a, b + 1).forEach((el) => setSel(el, true));
    } else {
      dragging = !img.classList.contains("sel");
      setSel(img, dragging);
      anchor = img;
    }
    updateCount();
  });
  document.addEventListener("mouseover", (ev) => {
    const img = ev.target.closest && ev.target.closest(".thumbs img");
    if (img && dragging !== null) {
      setSel(img, dragging);
      updateCount();
    }
  });
  document.addEventListener("mouseup", () => { dragging = null; });

  document.addEventListener("keydown", (ev) => {
    if (ev.target.matches("input:not([type=checkbox]), select, textarea")) return; // typing, not a shortcut
    const key = ev.key.toLowerCase();
    if ((ev.ctrlKey || ev.metaKey) && key === "z") { ev.preventDefault(); actions.undo(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const map = {m: "merge", s: "split", v: "move", x: "exclude", u: "undo"};
    if (map[key]) { ev.preventDefault(); actions[map[key]](); }
    else if (key === "escape") {
      document.querySelectorAll(".thumbs img.sel").forEach((el) => setSel(el, false));
      updateCount();
    }
  });

  const scroll = sessionStorage.getItem("yokai-scroll");
  if (scroll !== null) { window.scrollTo(0, Number(scroll)); sessionStorage.removeItem("yokai-scroll"); }
  window.__reviewReady = true;
})();

// Sign-in, navigation between views (#hash, never a secret), and view refreshes.
import { get, session } from "./api.js";
import { adaptersView } from "./adapters.js";
import { adminView } from "./admin.js";
import { datasetsView } from "./datasets.js";
import { jobsView } from "./jobs.js";
import { playgroundView } from "./playground.js";
import { usageView } from "./usage.js";
import { $, clearMessages, el, showError } from "./ui.js";

const jobs = jobsView();
const views = {
  tenant: [
    ["adapters", "Adapters", adaptersView()],
    ["datasets", "Datasets", datasetsView(() => jobs.refreshDatasets())],
    ["jobs", "Training jobs", jobs],
    ["playground", "Playground", playgroundView()],
    ["usage", "Usage", usageView()],
  ],
  admin: [["tenants", "Tenants", adminView()]],
};

function allSections() { return document.querySelectorAll("main > section"); }

function show(name) {
  const list = views[session.kind] || [];
  const entry = list.find(([id]) => id === name) || list[0];
  if (!entry) return;
  for (const section of allSections()) section.hidden = section.id !== `view-${entry[0]}`;
  for (const button of document.querySelectorAll("#nav button")) {
    if (button.dataset.view === entry[0]) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (entry[0] !== "jobs") jobs.stop();
  entry[2].refresh();
}

function signedIn() {
  const list = views[session.kind];
  $("#nav").replaceChildren(...list.map(([id, label]) => el("button", { type: "button", "data-view": id, text: label,
    onclick: () => { if (location.hash === `#${id}`) show(id); else location.hash = id; } })));
  $("#nav").hidden = false;
  $("#whoami").textContent = session.kind === "admin" ? "Signed in with the admin key" : "Signed in with a tenant key";
  $("#whoami").hidden = false;
  $("#sign-out").hidden = false;
  show(location.hash.slice(1));
}

function signedOut() {
  jobs.stop();
  session.clear();
  views.admin[0][2].hideKey();
  for (const section of allSections()) section.hidden = section.id !== "view-signin";
  $("#nav").hidden = true;
  $("#nav").replaceChildren();
  $("#whoami").hidden = true;
  $("#sign-out").hidden = true;
  $("#signin-key").focus();
}

$("#signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = $("#signin-key");
  const key = input.value.trim();
  const kind = new FormData(e.target).get("kind");
  clearMessages();
  session.set(key, kind);
  try {
    await get(kind === "admin" ? "/admin/tenants?limit=1" : "/v1/models");
  } catch (err) {
    session.clear();
    showError(err, "sign-in failed");
    input.select();
    return;
  }
  input.value = "";
  signedIn();
});

$("#sign-out").addEventListener("click", () => { clearMessages(); signedOut(); });
window.addEventListener("hashchange", () => { if (session.key) show(location.hash.slice(1)); });

if (session.key && views[session.kind]) signedIn(); else signedOut();

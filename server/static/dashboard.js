// The dashboard's own script: drag-and-drop upload, forms sent as the API's JSON bodies, and showing
// refused requests. Loaded from a file (the Content-Security-Policy allows no inline script).
"use strict";

function showFlash(text, isError) {
  const flash = document.getElementById("flash");
  if (!flash) return;
  flash.textContent = text;
  flash.className = isError ? "error" : "";
}

// A problem document's detail and the fields it names, or the status line when the body is not one.
function problemText(status, body) {
  try {
    const problem = JSON.parse(body);
    if (!problem.detail) return `HTTP ${status}`;
    const fields = (problem.errors || []).map((error) => `${error.field} ${error.message}`);
    const text = `${problem.title || status}: ${problem.detail}`;
    return fields.length ? `${text} (${fields.join("; ")})` : text;
  } catch (_) {
    return `HTTP ${status}`;
  }
}

function chosenOperations(form) {
  const operations = [];
  const width = form.elements.width.value;
  if (width) operations.push({ type: "resize", params: { width: Number(width) } });
  const convert = {};
  if (form.elements.format.value) convert.format = form.elements.format.value;
  if (form.elements.quality.value) convert.quality = Number(form.elements.quality.value);
  if (Object.keys(convert).length) operations.push({ type: "convert", params: convert });
  return operations;
}

// The archive a new batch asks for: none, or a ZIP of the results as rendered or re-encoded.
function chosenArchive(form) {
  const format = form.elements.archive.value;
  if (!format) return false;
  const archive = { format: format };
  if (form.elements.archive_quality.value) archive.quality = Number(form.elements.archive_quality.value);
  return archive;
}

// What each form with `data-json-body` sends: the body of the API route the dashboard runs for it.
const JSON_BODIES = {
  endpoint: (form) => ({
    url: form.elements.url.value,
    events: Array.from(form.querySelectorAll('input[name="events"]:checked'), (box) => box.value),
    description: form.elements.description.value,
  }),
  batch: (form) => ({ operations: chosenOperations(form), archive: chosenArchive(form) }),
};

htmx.defineExtension("json-body", {
  onEvent: (name, event) => {
    if (name === "htmx:configRequest") event.detail.headers["Content-Type"] = "application/json";
  },
  encodeParameters: (xhr, parameters, form) => {
    xhr.overrideMimeType("text/html");
    return JSON.stringify(JSON_BODIES[form.dataset.jsonBody](form));
  },
});

async function uploadFiles(form, files) {
  const status = form.querySelector("output");
  // A batch's drop zone picks none: its images take the batch's operations.
  const operations = form.elements.format ? JSON.stringify(chosenOperations(form)) : null;
  let sent = 0;
  for (const file of files) {
    status.textContent = `Uploading ${file.name} (${sent + 1} of ${files.length})…`;
    const body = new FormData();
    if (operations !== null) body.append("operations", operations);
    body.append("file", file, file.name);
    const response = await fetch(form.dataset.action, {
      method: "POST",
      body: body,
      credentials: "same-origin",
      headers: { "X-CSRF-Token": form.dataset.csrfToken },
    });
    if (!response.ok) {
      status.textContent = `${file.name}: ${problemText(response.status, await response.text())}`;
      status.className = "error";
      return;
    }
    sent += 1;
  }
  status.className = "";
  status.textContent = `${sent} uploaded; their status updates below as they are processed.`;
}

function setUpDropZone(form) {
  const zone = form.querySelector(".drop-zone");
  const input = form.querySelector('input[type="file"]');
  form.addEventListener("submit", (event) => event.preventDefault());
  input.addEventListener("change", () => {
    uploadFiles(form, Array.from(input.files));
    input.value = "";
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    uploadFiles(form, Array.from(event.dataTransfer.files));
  });
}

// Drop zones on the page, and those a response brings (a new batch's).
htmx.onLoad((element) => {
  const forms = Array.from(element.querySelectorAll("form.upload"));
  if (element.matches("form.upload")) forms.push(element);
  forms.forEach(setUpDropZone);
});

document.addEventListener("DOMContentLoaded", () => {
  document.body.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    showFlash(problemText(xhr.status, xhr.responseText), true);
  });
  document.body.addEventListener("htmx:afterRequest", (event) => {
    if (event.detail.successful && event.detail.target && event.detail.target.id !== "flash") {
      showFlash("", false);
    }
  });
});

// The dashboard's own script: drag-and-drop upload and showing refused requests. Loaded from a file
// (the Content-Security-Policy allows no inline script).
"use strict";

function showFlash(text, isError) {
  const flash = document.getElementById("flash");
  if (!flash) return;
  flash.textContent = text;
  flash.className = isError ? "error" : "";
}

// A problem document's detail, or the status line when the body is not one.
function problemText(status, body) {
  try {
    const problem = JSON.parse(body);
    return problem.detail ? `${problem.title || status}: ${problem.detail}` : `HTTP ${status}`;
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

async function uploadFiles(form, files) {
  const status = document.getElementById("upload-status");
  const operations = JSON.stringify(chosenOperations(form));
  let sent = 0;
  for (const file of files) {
    status.textContent = `Uploading ${file.name} (${sent + 1} of ${files.length})…`;
    const body = new FormData();
    body.append("operations", operations);
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

function setUpDropZone() {
  const form = document.getElementById("upload");
  if (!form) return;
  const zone = document.getElementById("drop-zone");
  const input = document.getElementById("upload-files");
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

document.addEventListener("DOMContentLoaded", () => {
  setUpDropZone();
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

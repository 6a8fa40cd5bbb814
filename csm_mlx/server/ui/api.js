// Every call to the API goes through request(): it sends the key when the server wants one (asked
// for once, kept in this browser) and turns a refusal into the server's own message.
const KEY_ITEM = "csm-mlx.api-key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
  } catch {
    // the body was cut off: the status is all there is
  }
  try {
    const message = JSON.parse(text)?.error?.message;
    if (message) return message;
  } catch {
    // not an OpenAI error body (a proxy's page, say): show its start
  }
  return `${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
}

function askKey(reason) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = `The server says: ${reason}`;
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? input.value.trim() : ""),
                            { once: true });
    dialog.showModal();
  });
}

let asking = null; // requests refused together share one prompt

export async function request(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers);
    const key = localStorage.getItem(KEY_ITEM);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...init, headers });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `the server cannot be reached (${e.message})`);
    }
    if (response.status === 401) {
      const message = await errorMessage(response);
      asking ??= askKey(message).finally(() => { asking = null; });
      const entered = await asking;
      if (!entered) throw new ApiError(401, message);
      localStorage.setItem(KEY_ITEM, entered);
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return response;
  }
}

export async function getJson(path, init) {
  return (await request(path, init)).json();
}

export function showError(element, error) {
  if (!error) {
    element.hidden = true;
    element.textContent = "";
    return;
  }
  element.textContent = error instanceof ApiError ? error.message : `${error.name}: ${error.message}`;
  element.hidden = false;
}

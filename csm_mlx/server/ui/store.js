// The history, in this browser's IndexedDB: nothing of it is sent to the server.
const DB_NAME = "csm-mlx";
const STORE = "history";
let db = null;

function open() {
  db ??= new Promise((resolve, reject) => {
    const opening = indexedDB.open(DB_NAME, 1);
    opening.onupgradeneeded = () => opening.result.createObjectStore(STORE, { keyPath: "id", autoIncrement: true });
    opening.onsuccess = () => resolve(opening.result);
    opening.onerror = () => reject(opening.error);
  });
  return db;
}

async function run(mode, action) {
  const database = await open();
  return new Promise((resolve, reject) => {
    const transaction = database.transaction(STORE, mode);
    const asked = action(transaction.objectStore(STORE));
    transaction.oncomplete = () => resolve(asked.result);
    transaction.onerror = transaction.onabort = () => reject(transaction.error);
  });
}

/** entry: {time, text, voice, settings, seconds, audio (a WAV Blob)} */
export const addEntry = (entry) => run("readwrite", (store) => store.add(entry));
export const allEntries = () => run("readonly", (store) => store.getAll());
export const removeEntry = (id) => run("readwrite", (store) => store.delete(id));

// ferry's browser peers: reach a service behind NAT straight from this page over WebRTC.
//
//   import * as ferry from "/.well-known/ferry/p2p.js";
//   const peer = await ferry.connect("app.example.com");   // default: this page's host
//   const res = await peer.fetch("/video/1.mp4");          // a Response, as window.fetch gives
//   const { readable, writable } = await peer.openStream(); // raw bytes to the service
//
// The server passes the page's offer to the client serving the host; the client answers
// with addresses to reach it at. If no data channel opens within `timeout` ms, the peer
// goes through the server's ordinary HTTP tunnel instead: `peer.mode` is "direct" or "relay".
//
// Flow control: each side of a channel may send CREDIT bytes (binary messages) before the
// other grants more with a text message holding a decimal count of bytes; a reader grants
// what it consumed, so neither end holds more than CREDIT bytes of a channel.

const WELL_KNOWN = "/.well-known/ferry/";
const CONTROL_LABEL = "ferry-control";
/// Bytes one side of a channel may send before the other grants more.
const CREDIT = 1 << 20;
/// Consumed bytes are granted back once at least this many add up.
const GRANT_STEP = CREDIT / 4;
/// Largest message sent.
const PIECE = 64 * 1024;

/** Connects to the service at `host`; rejects when the server or client refuses. */
export async function connect(host = location.host, { timeout = 5000 } = {}) {
  const pc = new RTCPeerConnection();
  const control = pc.createDataChannel(CONTROL_LABEL);
  await pc.setLocalDescription(await pc.createOffer());
  const res = await fetch(`${location.protocol}//${host}${WELL_KNOWN}offer`, {
    method: "POST",
    body: JSON.stringify(pc.localDescription),
  });
  if (!res.ok) {
    pc.close();
    throw new Error(`ferry: ${res.status} ${(await res.text()).trim()}`);
  }
  await pc.setRemoteDescription(await res.json());
  const open = await Promise.race([opened(control), sleep(timeout).then(() => false)]);
  if (!open) pc.close();
  return new Peer(open ? pc : null, host);
}

function opened(channel) {
  return new Promise((resolve) => {
    if (channel.readyState === "open") return resolve(true);
    channel.onopen = () => resolve(true);
    channel.onclose = () => resolve(false);
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class Peer {
  constructor(pc, host) {
    this.pc = pc;
    this.host = host;
    /** "direct": data channels to the client; "relay": through the server. */
    this.mode = pc ? "direct" : "relay";
  }

  /** Ends the peer connection and every stream on it. */
  close() {
    if (this.pc) this.pc.close();
  }

  /** A duplex byte stream to the service: { readable, writable }. */
  async openStream() {
    if (!this.pc) throw new Error("ferry: no direct connection (relay mode)");
    const channel = this.pc.createDataChannel("ferry");
    channel.binaryType = "arraybuffer";
    if (!(await opened(channel))) throw new Error("ferry: the client closed the channel");
    // What arrived and is not read yet (at most CREDIT bytes), and whoever waits for more.
    const arrived = [];
    let closed = false;
    let credit = CREDIT;
    let consumed = 0;
    const waiting = [];
    const changed = () => new Promise((resolve) => waiting.push(resolve));
    const wake = () => waiting.splice(0).forEach((resolve) => resolve());
    channel.onmessage = (e) => {
      if (typeof e.data === "string") credit += Number(e.data) || 0;
      else arrived.push(new Uint8Array(e.data));
      wake();
    };
    channel.onclose = () => { closed = true; wake(); };
    const readable = new ReadableStream({
      async pull(controller) {
        while (!arrived.length && !closed) await changed();
        if (!arrived.length) return controller.close();
        const chunk = arrived.shift();
        controller.enqueue(chunk);
        consumed += chunk.byteLength;
        if (consumed >= GRANT_STEP && channel.readyState === "open") {
          channel.send(String(consumed));
          consumed = 0;
        }
      },
      cancel() { channel.close(); },
    }, { highWaterMark: 0 });
    channel.bufferedAmountLowThreshold = CREDIT / 2;
    const writable = new WritableStream({
      async write(chunk) {
        const bytes = chunk instanceof Uint8Array ? chunk : new Uint8Array(await new Response(chunk).arrayBuffer());
        for (let at = 0; at < bytes.length; at += PIECE) {
          const piece = bytes.subarray(at, at + PIECE);
          while (credit < piece.length && !closed) await changed();
          if (closed) throw new Error("ferry: the channel closed");
          while (channel.bufferedAmount > CREDIT) {
            await new Promise((resolve) => { channel.onbufferedamountlow = resolve; });
          }
          credit -= piece.length;
          channel.send(piece);
        }
      },
      close() { /* the service answers, then the channel closes */ },
      abort() { channel.close(); },
    });
    return { readable, writable, close: () => channel.close() };
  }

  /** HTTP/1.1 over a data channel of its own; resolves to a streaming Response. */
  async fetch(path, init = {}) {
    if (!this.pc) return fetch(`${location.protocol}//${this.host}${path}`, init);
    const method = (init.method || "GET").toUpperCase();
    const body = init.body == null ? new Uint8Array() : new Uint8Array(await new Response(init.body).arrayBuffer());
    const headers = new Headers(init.headers || {});
    let head = `${method} ${path} HTTP/1.1\r\nHost: ${this.host}\r\nConnection: close\r\n`;
    if (body.length || method === "POST" || method === "PUT") head += `Content-Length: ${body.length}\r\n`;
    headers.forEach((value, name) => { head += `${name}: ${value}\r\n`; });
    const stream = await this.openStream();
    const writer = stream.writable.getWriter();
    await writer.write(new TextEncoder().encode(head + "\r\n"));
    if (body.length) await writer.write(body);
    writer.releaseLock();
    return readResponse(stream.readable.getReader());
  }
}

/** Reads a response head from `reader`, then streams the body (chunked or not). */
async function readResponse(reader) {
  let buffered = new Uint8Array();
  let end = -1;
  while ((end = headEnd(buffered)) < 0) {
    const { value, done } = await reader.read();
    if (done) throw new Error("ferry: the service closed before its response head");
    buffered = concat(buffered, value);
  }
  const lines = new TextDecoder().decode(buffered.subarray(0, end)).split("\r\n");
  const [, status, ...reason] = lines[0].split(" ");
  const headers = new Headers();
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    if (colon > 0) headers.append(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
  }
  const rest = buffered.subarray(end + 4);
  let body = new ReadableStream({
    start(controller) { if (rest.length) controller.enqueue(rest); },
    async pull(controller) {
      const { value, done } = await reader.read();
      if (done) controller.close(); else controller.enqueue(value);
    },
    cancel() { reader.cancel(); },
  });
  if ((headers.get("transfer-encoding") || "").toLowerCase().includes("chunked")) {
    body = body.pipeThrough(dechunk());
    headers.delete("transfer-encoding");
  }
  const nullBody = [101, 204, 205, 304].includes(Number(status));
  return new Response(nullBody ? null : body, { status: Number(status), statusText: reason.join(" "), headers });
}

function headEnd(bytes) {
  for (let i = 0; i + 3 < bytes.length; i++) {
    if (bytes[i] === 13 && bytes[i + 1] === 10 && bytes[i + 2] === 13 && bytes[i + 3] === 10) return i;
  }
  return -1;
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/** Undoes chunked transfer coding. */
function dechunk() {
  let buffered = new Uint8Array();
  let left = -1; // bytes left in the current chunk, -1 while reading a size line
  return new TransformStream({
    transform(piece, controller) {
      buffered = concat(buffered, piece);
      for (;;) {
        if (left < 0) {
          const nl = buffered.indexOf(10);
          if (nl < 0) return;
          const size = parseInt(new TextDecoder().decode(buffered.subarray(0, nl)).split(";")[0].trim(), 16);
          buffered = buffered.subarray(nl + 1);
          if (!(size > 0)) { controller.terminate(); return; }
          left = size;
        }
        if (buffered.length < left + 2) {
          if (buffered.length > left) return;
          controller.enqueue(buffered.slice(0, buffered.length));
          left -= buffered.length;
          buffered = new Uint8Array();
          return;
        }
        controller.enqueue(buffered.slice(0, left));
        buffered = buffered.subarray(left + 2);
        left = -1;
      }
    },
  });
}

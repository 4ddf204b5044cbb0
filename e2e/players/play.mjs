// Plays a manifest in a real player inside headless Chromium and prints what the player saw, as JSON.
//
//   node play.mjs <hls|dash|shaka> <folder> <manifest path inside it> [rate]
//
// The folder is served over loopback together with the players (from TESSERA_PLAYERS/node_modules, or the
// node_modules beside this file). The page plays the stream muted to its `ended` event and reports the
// decoded frame count, the audio and text tracks the player lists (with their languages), the duration and
// any fatal player error. Exit status 0 whenever a report was printed; the test judges it.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const [kind, root, manifest, rateArg] = process.argv.slice(2);
if (!['hls', 'dash', 'shaka'].includes(kind) || !root || !manifest) {
  console.error('usage: node play.mjs <hls|dash|shaka> <folder> <manifest> [rate]');
  process.exit(2);
}
const rate = Number(rateArg || 2);
const modules = path.join(process.env.TESSERA_PLAYERS || path.dirname(new URL(import.meta.url).pathname), 'node_modules');
const require = createRequire(path.join(modules, 'noop.js'));
const puppeteer = require('puppeteer-core');

const libs = {
  '/lib/hls.js': path.join(modules, 'hls.js/dist/hls.min.js'),
  '/lib/dash.js': path.join(modules, 'dashjs/dist/modern/umd/dash.all.min.js'),
  '/lib/shaka.js': path.join(modules, 'shaka-player/dist/shaka-player.compiled.js'),
};
const types = {
  '.m3u8': 'application/vnd.apple.mpegurl', '.mpd': 'application/dash+xml', '.ts': 'video/mp2t',
  '.m4s': 'video/iso.segment', '.mp4': 'video/mp4', '.vtt': 'text/vtt', '.js': 'text/javascript',
  '.html': 'text/html', '.jpg': 'image/jpeg', '.aac': 'audio/aac',
};

const page = `<!doctype html><html><body><video id="v" muted playsinline></video>
<script>
// Keep the players' source buffers, so a stall can be reported with what each track had buffered.
window.sourceBuffers = [];
if (window.MediaSource) { const add = MediaSource.prototype.addSourceBuffer; MediaSource.prototype.addSourceBuffer = function (type) { const sb = add.call(this, type); window.sourceBuffers.push({ type, sb }); return sb; }; }
</script>
<script src="/lib/${kind}.js"></script>
<script>
const report = { kind: '${kind}', ended: false, errors: [], audio: [], text: [], frames: 0, duration: 0 };
window.report = report;
const v = document.getElementById('v');
const url = '/out/${encodeURI(manifest)}';
function cues() {
  return Array.from(v.textTracks).map(t => ({ mode: t.mode, kind: t.kind, lang: t.language, cues: Array.from(t.cues || []).map(c => ({ start: c.startTime, end: c.endTime, text: c.text })) }));
}
function finish() { report.cues = cues(); const q = v.getVideoPlaybackQuality(); report.frames = q.totalVideoFrames; report.dropped = q.droppedVideoFrames; report.duration = v.duration; report.currentTime = v.currentTime; }
v.addEventListener('ended', () => { finish(); report.ended = true; });
v.addEventListener('error', () => report.errors.push('video element: ' + (v.error && v.error.message)));
v.addEventListener('loadedmetadata', () => { v.playbackRate = ${rate}; v.play().catch(e => report.errors.push('play: ' + e)); });
async function start() {
  if ('${kind}' === 'hls') {
    const h = new Hls({ enableWorker: true });
    h.on(Hls.Events.ERROR, (_, d) => { if (d.fatal) report.errors.push('hls.js: ' + d.type + ' ' + d.details); });
    h.on(Hls.Events.AUDIO_TRACKS_UPDATED, () => { report.audio = h.audioTracks.map(t => ({ lang: t.lang, name: t.name, channels: t.channels })); });
    h.on(Hls.Events.SUBTITLE_TRACKS_UPDATED, () => { report.text = h.subtitleTracks.map(t => ({ lang: t.lang, name: t.name, forced: t.forced })); });
    v.addEventListener('loadedmetadata', () => { if (h.subtitleTracks.length) { h.subtitleDisplay = true; h.subtitleTrack = 0; } });
    h.loadSource(url); h.attachMedia(v);
  } else if ('${kind}' === 'dash') {
    const p = dashjs.MediaPlayer().create();
    p.on(dashjs.MediaPlayer.events.ERROR, e => report.errors.push('dash.js: ' + JSON.stringify(e.error || e)));
    p.on(dashjs.MediaPlayer.events.STREAM_INITIALIZED, () => {
      report.audio = p.getTracksFor('audio').map(t => ({ lang: t.lang, name: (t.labels || []).map(l => l.text).join(' ') }));
      report.text = p.getTracksFor('text').map(t => ({ lang: t.lang }));
    });
    p.initialize(v, url, false);
    p.on(dashjs.MediaPlayer.events.STREAM_INITIALIZED, () => { if (p.getTracksFor('text').length) { p.enableText(true); p.setTextTrack(0); } });
  } else {
    shaka.polyfill.installAll();
    const p = new shaka.Player();
    p.addEventListener('error', e => report.errors.push('shaka: ' + e.detail.code));
    await p.attach(v);
    try { await p.load(url); } catch (e) { report.errors.push('shaka load: ' + e.code); return; }
    report.audio = p.getAudioTracks().map(t => ({ lang: t.language, name: t.label, channels: t.channelsCount }));
    report.text = p.getTextTracks().map(t => ({ lang: t.language, kind: t.kind }));
    window.shakaPlayer = p;
    if (p.getTextTracks().length) { p.selectTextTrack(p.getTextTracks()[0]); }
  }
}
start().catch(e => report.errors.push('start: ' + e));
</script></body></html>`;

const server = http.createServer((req, res) => {
  const u = decodeURIComponent(new URL(req.url, 'http://x').pathname);
  let file = null;
  if (u === '/') { res.writeHead(200, { 'content-type': 'text/html' }); return res.end(page); }
  if (u === '/favicon.ico') { res.writeHead(204); return res.end(); }
  if (libs[u]) file = libs[u];
  else if (u.startsWith('/out/')) {
    file = path.join(root, u.slice(5));
    if (!file.startsWith(path.resolve(root))) file = null;
  }
  if (!file || !fs.existsSync(file) || !fs.statSync(file).isFile()) { res.writeHead(404); return res.end(); }
  const size = fs.statSync(file).size;
  const range = /bytes=(\d+)-(\d*)/.exec(req.headers.range || '');
  const type = types[path.extname(file)] || 'application/octet-stream';
  if (range) {
    const start = Number(range[1]); const end = range[2] ? Number(range[2]) : size - 1;
    res.writeHead(206, { 'content-type': type, 'content-range': `bytes ${start}-${end}/${size}`, 'content-length': end - start + 1 });
    fs.createReadStream(file, { start, end }).pipe(res);
  } else {
    res.writeHead(200, { 'content-type': type, 'content-length': size });
    fs.createReadStream(file).pipe(res);
  }
});
await new Promise(r => server.listen(0, '127.0.0.1', r));
const port = server.address().port;

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--autoplay-policy=no-user-gesture-required', '--disable-gpu', '--mute-audio', '--disable-quic',
    '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let result;
try {
  const tab = await browser.newPage();
  const console_ = [];
  tab.on('console', m => { if (m.type() === 'error') console_.push(m.text()); });
  await tab.goto(`http://127.0.0.1:${port}/`);
  // Poll until the player reports the end or a fatal error (never a fixed sleep).
  const deadline = Date.now() + Number(process.env.PLAY_TIMEOUT_MS || 120000);
  for (;;) {
    result = await tab.evaluate(() => { const r = window.report; const v = document.getElementById('v'); return { ...r, frames: r.ended ? r.frames : v.getVideoPlaybackQuality().totalVideoFrames, currentTime: v.currentTime }; });
    if (result.ended || result.errors.length) break;
    if (Date.now() > deadline) {
      // Where it stopped, for the test's message: what the element had buffered and why it was not playing.
      const at = await tab.evaluate(() => { const v = document.getElementById('v'); const ranges = b => Array.from({ length: b.length }, (_, i) => [b.start(i), b.end(i)]); return { buffered: ranges(v.buffered), readyState: v.readyState, paused: v.paused, seeking: v.seeking, duration: v.duration, sourceBuffers: (window.sourceBuffers || []).map(s => { try { return { type: s.type, buffered: ranges(s.sb.buffered) }; } catch (e) { return { type: s.type, gone: true }; } }) }; });
      result.stall = at;
      result.errors.push(`timed out before the end (at ${result.currentTime}s of ${at.duration}s, buffered ${JSON.stringify(at.buffered)}, readyState ${at.readyState})`);
      break;
    }
    await new Promise(r => setTimeout(r, 200));
  }
  if (kind === 'shaka' && process.env.THUMBNAIL_TIMES) {
    result.thumbnails = await tab.evaluate(async (times) => {
      const p = window.shakaPlayer;
      const track = p.getImageTracks()[0];
      if (!track) return { error: 'no image track' };
      const out = [];
      for (const t of times) {
        const th = await p.getThumbnails(track.id, t);
        out.push(th && { time: t, uris: th.uris, x: th.positionX, y: th.positionY, w: th.width, h: th.height, start: th.startTime, duration: th.duration });
      }
      return { track: { width: track.width, height: track.height }, thumbnails: out };
    }, process.env.THUMBNAIL_TIMES.split(',').map(Number));
  }
  result.consoleErrors = console_;
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(result));

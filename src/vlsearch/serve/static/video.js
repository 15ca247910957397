// Video results on the page: a time badge on the card, and the viewer plays the clip from its moment.
// app.js calls vlsVideo.decorate(card, hit) and vlsVideo.open(hit) / vlsVideo.close(); both do nothing
// for photos.
"use strict";

window.vlsVideo = (() => {
  function clock(t) {
    t = Math.max(0, Math.floor(Number(t) || 0));
    const h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), s = t % 60;
    const mm = h ? String(m).padStart(2, "0") : String(m);
    return (h ? `${h}:` : "") + `${mm}:${String(s).padStart(2, "0")}`;
  }

  function span(hit) {
    return `${clock(hit.t_start)}-${clock(hit.t_end)}`;
  }

  function decorate(fig, hit) {
    if (hit.kind !== "video") return;
    fig.classList.add("video");
    const badge = document.createElement("span");
    badge.className = "moment";
    badge.textContent = `▶ ${span(hit)}`;
    fig.querySelector(".frame").append(badge);
  }

  function open(hit) {
    const video = document.getElementById("viewer-video");
    const img = document.getElementById("viewer-img");
    if (hit.kind !== "video") {
      close();
      img.hidden = false;
      return false;
    }
    img.hidden = true;
    video.hidden = false;
    const start = Number(hit.t_start) || 0;
    video.dataset.start = String(start);
    video.dataset.end = String(hit.t_end);
    // the media fragment starts the clip at the moment; currentTime again once metadata is known
    video.src = `${hit.video_url}#t=${start.toFixed(2)}`;
    video.addEventListener(
      "loadedmetadata",
      () => {
        if (Math.abs(video.currentTime - start) > 0.25) video.currentTime = start;
        video.play().catch(() => {}); // autoplay may be refused: the controls are there
      },
      { once: true },
    );
    document.getElementById("viewer-title").textContent = `#${hit.rank} · ${hit.id} @ ${span(hit)}`;
    document.getElementById("viewer-link").href = hit.video_url;
    document.getElementById("viewer-link").textContent = "open the video";
    return true;
  }

  function close() {
    const video = document.getElementById("viewer-video");
    if (!video) return;
    video.pause();
    video.removeAttribute("src");
    video.load();
    video.hidden = true;
    document.getElementById("viewer-link").textContent = "open the image";
  }

  return { decorate, open, close, clock };
})();

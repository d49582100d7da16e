"""An interactive 3D organ view that lives inside the self-contained HTML report.

No WebGL and no external script: the meshes are embedded (base64 float32/uint32) and drawn on a 2D
canvas with depth-sorted, flat-shaded triangles, so the view opens offline, in any browser, on any
hospital workstation. Drag to rotate, wheel to zoom, tick boxes to show/hide organs.
Coordinates are the meshes' own (LPS, mm); the initial view is anterior (patient's right on the left).
"""

from __future__ import annotations

import base64
import html
import json

import numpy as np
import trimesh

from fadal.navigation.render import organ_color


def _b64(arr: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode("ascii")


def _simplify(mesh: trimesh.Trimesh, max_faces: int) -> trimesh.Trimesh:
    if len(mesh.faces) <= max_faces:
        return mesh
    try:
        return mesh.simplify_quadric_decimation(face_count=max_faces)
    except Exception:  # decimation backend missing: subsample faces (display only)
        keep = np.linspace(0, len(mesh.faces) - 1, max_faces).astype(int)
        return trimesh.Trimesh(mesh.vertices, mesh.faces[keep], process=False)


#: The viewer's markup: a canvas and a row of organ toggles (``@TITLE@``: the escaped title).
_MARKUP = """
<div class="organ-viewer" id="organ-viewer">
  <p class="meta">@TITLE@: drag to rotate, scroll to zoom. LPS world coordinates (mm); starts from anterior.</p>
  <canvas id="organ-canvas" width="760" height="560" style="border:1px solid #d1d9e0;border-radius:4px;background:#10151c;cursor:grab"></canvas>
  <div id="organ-toggles" style="margin:6px 0 0"></div>
</div>
"""

#: The viewer's script: decodes the organs (``@ORGANS@``: their JSON), then draws depth-sorted, flat-shaded
#: triangles on each change of rotation, zoom or visibility.
_SCRIPT = """<script>
(function() {
  const organs = @ORGANS@;
  const canvas = document.getElementById('organ-canvas');
  const ctx = canvas.getContext('2d');
  const toggles = document.getElementById('organ-toggles');
  function decode(b64, Type) {
    const bin = atob(b64); const buf = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) buf[i] = bin.charCodeAt(i);
    return new Type(buf.buffer);
  }
  let lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
  organs.forEach(o => {
    o.verts = decode(o.v, Float32Array); o.faces = decode(o.f, Uint32Array); o.visible = true;
    for (let i = 0; i < o.verts.length; i += 3)
      for (let k = 0; k < 3; k++) { lo[k] = Math.min(lo[k], o.verts[i + k]); hi[k] = Math.max(hi[k], o.verts[i + k]); }
    const label = document.createElement('label');
    label.style.marginRight = '14px';
    const box = document.createElement('input'); box.type = 'checkbox'; box.checked = true;
    box.onchange = () => { o.visible = box.checked; draw(); };
    const sw = document.createElement('span');
    sw.style.cssText = `display:inline-block;width:12px;height:12px;margin:0 4px;background:rgb(${o.color})`;
    label.append(box, sw, document.createTextNode(o.name)); toggles.append(label);
  });
  const center = lo.map((l, k) => (l + hi[k]) / 2);
  const extent = Math.max(...hi.map((h, k) => h - lo[k]), 1);
  let yaw = 0, pitch = 0, zoom = 1;
  function draw() {
    const W = canvas.width, H = canvas.height, s = zoom * 0.8 * Math.min(W, H) / extent;
    const cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
    ctx.fillStyle = '#10151c'; ctx.fillRect(0, 0, W, H);
    const tris = [];
    organs.forEach(o => {
      if (!o.visible) return;
      const v = o.verts, n = v.length / 3, P = new Float32Array(v.length);
      for (let i = 0; i < n; i++) {
        const x = v[3*i] - center[0], y = v[3*i+1] - center[1], z = v[3*i+2] - center[2];
        const x1 = cy * x - sy * y, y1 = sy * x + cy * y;           // yaw about the S axis
        const y2 = cp * y1 - sp * z, z2 = sp * y1 + cp * z;         // pitch about the L axis
        P[3*i] = W / 2 + s * x1; P[3*i+1] = H / 2 - s * z2; P[3*i+2] = y2;  // anterior view: depth = +P
      }
      const f = o.faces;
      for (let t = 0; t < f.length; t += 3) {
        const a = 3*f[t], b = 3*f[t+1], c = 3*f[t+2];
        const ux = P[b]-P[a], uy = P[b+1]-P[a+1], uz = P[b+2]-P[a+2];
        const vx = P[c]-P[a], vy = P[c+1]-P[a+1], vz = P[c+2]-P[a+2];
        const nx = uy*vz - uz*vy, ny = uz*vx - ux*vz, nz = ux*vy - uy*vx;
        const len = Math.hypot(nx, ny, nz) || 1;
        const light = 0.35 + 0.65 * Math.abs(nz / len);
        tris.push([(P[a+2] + P[b+2] + P[c+2]) / 3, P[a], P[a+1], P[b], P[b+1], P[c], P[c+1], o.color, light]);
      }
    });
    tris.sort((p, q) => q[0] - p[0]);  // far (posterior) first
    for (const t of tris) {
      const c = t[7], l = t[8];
      ctx.fillStyle = `rgb(${c[0]*l|0},${c[1]*l|0},${c[2]*l|0})`;
      ctx.beginPath(); ctx.moveTo(t[1], t[2]); ctx.lineTo(t[3], t[4]); ctx.lineTo(t[5], t[6]); ctx.closePath(); ctx.fill();
    }
    ctx.fillStyle = '#cfd6de'; ctx.font = '13px sans-serif';
    ctx.fillText('R', 8, H / 2); ctx.fillText('L', W - 16, H / 2); ctx.fillText('S', W / 2, 16);
    canvas.dataset.rendered = String(tris.length);
  }
  let drag = null;
  canvas.addEventListener('mousedown', e => { drag = [e.clientX, e.clientY]; canvas.style.cursor = 'grabbing'; });
  window.addEventListener('mouseup', () => { drag = null; canvas.style.cursor = 'grab'; });
  window.addEventListener('mousemove', e => {
    if (!drag) return;
    yaw += (e.clientX - drag[0]) * 0.01; pitch = Math.max(-1.5, Math.min(1.5, pitch + (e.clientY - drag[1]) * 0.01));
    drag = [e.clientX, e.clientY]; draw();
  });
  canvas.addEventListener('wheel', e => { e.preventDefault(); zoom *= e.deltaY < 0 ? 1.1 : 0.9; draw(); }, {passive: false});
  draw();
})();
</script>
"""


def viewer_html(meshes: dict[str, trimesh.Trimesh], title: str = "3D organ view", max_faces: int = 4000) -> str:
    """HTML fragment (a canvas, organ toggles and an inline script) for one case's organ meshes."""
    organs = _organ_payload(meshes, max_faces)
    return _MARKUP.replace("@TITLE@", html.escape(title)) + _SCRIPT.replace("@ORGANS@", json.dumps(organs).replace("<", "\\u003c"))  # no "</script>" from a name


def _organ_payload(meshes: dict[str, trimesh.Trimesh], max_faces: int) -> list[dict]:
    """Each non-empty organ as name, colour and base64 vertices (float32) and faces (uint32), simplified."""
    organs = []
    for name, mesh in meshes.items():
        if mesh is None or len(mesh.faces) == 0:
            continue
        m = _simplify(mesh, max_faces)
        color = [int(round(255 * c)) for c in organ_color(name)[:3]]
        organs.append({"name": name, "color": color, "v": _b64(m.vertices, "<f4"), "f": _b64(m.faces, "<u4")})
    return organs

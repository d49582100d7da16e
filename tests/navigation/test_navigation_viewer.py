"""The 3D viewer's inline script: organ names cannot close it."""

from __future__ import annotations

import json
import re

import trimesh

from fadal.navigation.viewer import viewer_html


def test_an_organ_name_cannot_end_the_inline_script():
    name = "liver</script><script>alert(1)</script>"
    page = viewer_html({name: trimesh.creation.box()})
    assert page.lower().count("</script") == 1  # the viewer's own closing tag only
    assert "<script>alert" not in page
    data = re.search(r"const organs = (.*);\n", page).group(1)
    assert json.loads(data)[0]["name"] == name  # the browser still reads the name unchanged

"""SynthBrain app: `streamlit run app.py` (or `synthbrain app`). Page config and navigation only."""

from pathlib import Path

import streamlit as st

from app_support import common, jobs, uploads, viewer

uploads.install()  # bound the server's upload memory (app_support/uploads.py); a no-op once done
# a local file, not a ":material/...:" icon: Streamlit fetches those favicons from Google's servers
st.set_page_config(page_title="SynthBrain", page_icon=str(Path(__file__).parent / "app_support" / "favicon.png"),
                   layout="wide")
# (script, title in the navigation, icon, the page's heading). app.py draws the heading, before the page
# runs, so it is on screen at once: a page's own imports and its bundle take seconds on a cold start
PAGES = [
    ("app_pages/generate.py", "Generate", ":material/neurology:", "Generate a synthetic brain"),
    ("app_pages/compare.py", "Compare", ":material/compare:", "Compare a scan with its reconstruction"),
    ("app_pages/trajectories.py", "Trajectories", ":material/timeline:", "Trajectories: one brain through age"),
    ("app_pages/audit.py", "Audit", ":material/policy:", "Audit samples for memorisation"),
    ("app_pages/model.py", "Model", ":material/description:", "Model: the bundle behind the samples"),
    ("app_pages/learn.py", "Learn", ":material/school:", "Learn: how a synthetic brain is made"),
]
pages = [st.Page(script, title=title, icon=icon, default=i == 0) for i, (script, title, icon, _) in enumerate(PAGES)]
page = st.navigation(pages)
st.title({p.url_path: h for p, (*_, h) in zip(pages, PAGES)}[page.url_path])
jobs.lower_script_priority()  # the rest of this run yields the CPU to the server's event loop (jobs.py)
common.import_model_code()  # torch, MONAI, diffusers in the background, now that the heading is out
viewer.preferences()  # the viewers' session preferences (radiological), in every page's sidebar
page.run()

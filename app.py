"""SynthBrain app: `streamlit run app.py` (or `synthbrain app`). Page config and navigation only."""

from pathlib import Path

import streamlit as st

from app_support import jobs, uploads, viewer

uploads.install()  # bound the server's upload memory (app_support/uploads.py); a no-op once done
jobs.lower_script_priority()  # this run's thread yields the CPU to the server's event loop (jobs.py)
# a local file, not a ":material/...:" icon: Streamlit fetches those favicons from Google's servers
st.set_page_config(page_title="SynthBrain", page_icon=str(Path(__file__).parent / "app_support" / "favicon.png"),
                   layout="wide")
page = st.navigation([
    st.Page("app_pages/generate.py", title="Generate", icon=":material/neurology:", default=True),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("app_pages/trajectories.py", title="Trajectories", icon=":material/timeline:"),
    st.Page("app_pages/audit.py", title="Audit", icon=":material/policy:"),
    st.Page("app_pages/model.py", title="Model", icon=":material/description:"),
    st.Page("app_pages/learn.py", title="Learn", icon=":material/school:"),
])
viewer.preferences()  # the viewers' session preferences (radiological), in every page's sidebar
page.run()

"""SynthBrain app: `streamlit run app.py` (or `synthbrain app`). Page config and navigation only."""

import streamlit as st

st.set_page_config(page_title="SynthBrain", page_icon=":material/neurology:", layout="wide")
st.navigation([
    st.Page("pages/generate.py", title="Generate", icon=":material/neurology:", default=True),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("pages/trajectories.py", title="Trajectories", icon=":material/timeline:"),
    st.Page("pages/model.py", title="Model", icon=":material/description:"),
    st.Page("pages/learn.py", title="Learn", icon=":material/school:"),
]).run()

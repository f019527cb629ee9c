"""The playground page (index.html), shipped as package data."""

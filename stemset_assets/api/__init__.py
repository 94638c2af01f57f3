"""Stemset's web API and player page: upload a recording, follow its job, play its stems.

:mod:`.app` the Starlette app, :mod:`.jobs` the jobs (Dagster runs), :mod:`.server` `stemset api serve`,
``static/`` the page (plain HTML, JS and CSS; Web Audio for synced multi-stem playback).
"""

"""/docs groups the routes by tag, with whole summaries; the console's API link opens it, and
its downloads say what each one is."""

TAGS = {"runs", "jobs", "modules", "maps", "cdr", "console", "operations"}


def test_every_operation_has_one_known_tag_and_a_whole_summary(inproc):
    doc = inproc.get("/openapi.json").json()
    tags = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert len(op["tags"]) == 1 and op["tags"][0] in TAGS, (method, path, op["tags"])
            tags.setdefault(op["tags"][0], []).append(path)
            summary = op["summary"]
            # one line, never cut where the docstring's line wrapped
            assert "  " not in summary and "\n" not in summary, (path, summary)
    assert set(tags) == TAGS
    assert "/runs/{run_id}/cancel" in tags["runs"] and "/ui/runs" in tags["console"]
    assert "/health" in tags["operations"] and "/cdr" in tags["cdr"]
    # its docstring's first sentence, which runs past the first line and ends there
    post = doc["paths"]["/runs"]["post"]["summary"]
    assert post == "Submit a run; answers at once with its RunStatus."


def test_the_console_header_links_the_api_to_swagger_ui(inproc):
    page = inproc.get("/ui/runs", headers={"Accept": "text/html"}).text
    assert '<a href="/docs">API</a>' in page


def test_downloads_say_what_each_is(inproc):
    run = inproc.post("/runs", json={"job": "labels", "map": "WY_CO_Peach",
                                     "modules": ["georeference"]}).json()
    inproc.wait_run(run["run_id"])
    for page in (f"/ui/runs/{run['run_id']}", "/ui/jobs/labels"):
        text = inproc.get(page, headers={"Accept": "text/html"}).text
        for label, kind in (("module log", "log"), ("logs (zip)", "logs"),
                            ("outputs (zip)", "outputs"), ("temps (zip)", "temps")):
            assert f'/modules/labels/georeference/{kind}"' in text, page
            assert f">{label}</a>" in text, (page, label)

"""The conformance kit on this plugin (run with pytest from this folder after pip install -e .)."""

from mergebench import check_method


def test_model_breadcrumbs_conforms():
    report = check_method("model_breadcrumbs")
    assert report.ok, report.render()

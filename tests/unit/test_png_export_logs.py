"""plotly's static exporter logs, with a traceback, Chromium messages it could not decode and then
ignores (choreographer's "JSONError decoding message. Ignoring"); `memdiag report --markdown` must
not print them as if memdiag had failed, and must keep its own warnings."""

import logging

from memdiag.report.markdown import quiet_exporter_logs


def test_the_exporters_recovered_errors_are_not_printed_and_ours_are(caplog):
    caplog.set_level(logging.WARNING)
    with quiet_exporter_logs():
        try:
            raise ValueError("Expecting property name enclosed in double quotes")
        except ValueError:
            logging.getLogger("choreographer.channels.pipe").exception("JSONError decoding message. Ignoring")
        logging.getLogger("memdiag.report").warning("a warning of ours")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a warning of ours"]
    # outside the export the exporter's loggers are as they were
    logging.getLogger("choreographer.channels.pipe").warning("after")
    assert caplog.records[-1].getMessage() == "after"

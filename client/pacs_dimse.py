"""DIMSE transport of `slmfed fetch` (pynetdicom: C-FIND, then C-GET, or C-MOVE to a storage SCP
this process starts for the run).

Why its own module: it is the only place that speaks DICOM networking: AE titles, the presentation
contexts a C-GET needs (the storage classes of an MR exam and its masks, with the SCP role), the
local storage SCP a C-MOVE sends to (on `move-bind`:`move-port`, loopback by default, as the
PACS has it registered for `move-ae`), TLS when configured, and the translation of refused
connections, rejected associations and failure statuses into one line naming the problem.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading

from client.fetch import InstanceInfo, PacsConfig, PacsError, SeriesInfo, StudyInfo

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # it logs every PDU; our errors are one line each

STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy Storage
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data Storage
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
)
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
GET = "1.2.840.10008.5.1.4.1.2.2.3"  # ... - GET
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # ... - MOVE
OK, PENDING = 0x0000, (0xFF00, 0xFF01)


def _str(ds, keyword: str) -> str:
    v = getattr(ds, keyword, "")
    return "" if v is None else str(v)


def _multi(ds, keyword: str) -> tuple[str, ...]:
    """A multi-valued attribute as a tuple of strings (pydicom gives a str for one value)."""
    v = getattr(ds, keyword, None)
    if v is None or v == "":
        return ()
    return (str(v),) if isinstance(v, str) else tuple(str(x) for x in v if str(x))


def _int(v) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return 0


class DimseTransport:
    """One DIMSE PACS (see client/fetch.py for the interface every transport offers)."""

    def __init__(self, cfg: PacsConfig):
        from pynetdicom import AE

        self.cfg = cfg
        self.assoc = None
        self.scp = None
        self._sink = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._reject = ""
        ae = AE(ae_title=cfg.calling_ae)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attr, cfg.timeout_s)
        ae.add_requested_context(FIND)
        if cfg.retrieve == "c-get":
            ae.add_requested_context(GET)
            for uid in STORAGE_CLASSES:
                ae.add_requested_context(uid)
        else:
            ae.add_requested_context(MOVE)
        self.ae = ae

    # -- the association ---------------------------------------------------------------------
    def _tls(self):
        if not self.cfg.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.cfg.ca_bundle or None)
        if self.cfg.tls_cert:
            ctx.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key or None)
        return (ctx, self.cfg.host)

    def _associate(self):
        from pynetdicom import build_role, evt

        if self.assoc is not None and self.assoc.is_established:
            return self.assoc
        label = self.cfg.label()
        try:  # a plain TCP connect first: "unreachable" is then told apart from "rejected"
            with socket.create_connection((self.cfg.host, self.cfg.port), timeout=self.cfg.timeout_s):
                pass
        except OSError as exc:
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else (
                "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or type(exc).__name__))
            raise PacsError(f"{label} is unreachable ({why})", fatal=True) from None
        self._reject = ""

        def on_acse(event):
            p = getattr(event, "primitive", None)
            if getattr(p, "result", None) in (0x01, 0x02):
                self._reject = f"{p.reason_str} (source: {p.source_str})"

        handlers = [(evt.EVT_ACSE_RECV, on_acse)]
        kwargs = {}
        if self.cfg.retrieve == "c-get":
            kwargs["ext_neg"] = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
            handlers.append((evt.EVT_C_STORE, self._on_store))
        tls = self._tls()
        if tls:
            kwargs["tls_args"] = tls
        assoc = self.ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.called_ae, evt_handlers=handlers,
                                  **kwargs)
        if assoc.is_established:
            self.assoc = assoc
            return assoc
        if assoc.is_rejected:
            p = getattr(getattr(assoc, "acceptor", None), "primitive", None)  # the A-ASSOCIATE-RJ received
            if getattr(p, "result", None) in (0x01, 0x02):
                self._reject = f"{p.reason_str} (source: {p.source_str})"
            hint = " (check called-ae, and that the PACS knows calling-ae)" if "AE title" in self._reject else ""
            raise PacsError(f"{label} rejected the association: {self._reject or 'no reason given'}{hint}", fatal=True)
        if assoc.is_aborted:
            raise PacsError(f"{label} aborted the association (no accepted presentation context, or TLS refused)",
                            fatal=True)
        raise PacsError(f"{label}: no association (no answer within {self.cfg.timeout_s:g} s)", fatal=True)

    def _status(self, what: str, status) -> int:
        if status is None or "Status" not in status:
            self.close()
            raise PacsError(f"{self.cfg.label()}: the association ended during {what} (timeout or abort)")
        return int(status.Status)

    # -- queries -----------------------------------------------------------------------------
    def _find(self, what: str, query) -> list:
        assoc = self._associate()
        out = []
        for status, ident in assoc.send_c_find(query, FIND):
            code = self._status(what, status)
            if code in PENDING:
                if ident is not None:
                    out.append(ident)
            elif code != OK:
                why = "refused (the PACS does not allow calling-ae to query)" if code & 0xFF00 == 0xA700 or code == 0x0122 \
                    else "failed"
                raise PacsError(f"{self.cfg.label()}: {what} {why} (C-FIND status 0x{code:04X})",
                                fatal=code & 0xFF00 == 0xA700)
        return out

    def find_studies(self, patient_id: str, accession: str) -> list[StudyInfo]:
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = patient_id or ""
        q.AccessionNumber = accession or ""
        q.StudyInstanceUID = ""
        q.StudyDate = ""
        q.ModalitiesInStudy = ""
        rows = self._find("the study query", q)
        out = []
        for r in rows:
            out.append(StudyInfo(_str(r, "StudyInstanceUID"), _str(r, "StudyDate"), _multi(r, "ModalitiesInStudy")))
        return out

    def find_series(self, study_uid: str) -> list[SeriesInfo]:
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.SeriesDescription = ""
        q.SeriesNumber = ""
        q.NumberOfSeriesRelatedInstances = ""
        out = []
        for r in self._find("the series query", q):
            n = getattr(r, "NumberOfSeriesRelatedInstances", None)
            out.append(SeriesInfo(_str(r, "SeriesInstanceUID"), _str(r, "Modality"), _str(r, "SeriesDescription"),
                                  _int(getattr(r, "SeriesNumber", 0)), _int(n) if n not in (None, "") else None))
        return out

    def find_instances(self, study_uid: str, series_uid: str, modality: str = "MR") -> list[InstanceInfo]:
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        q.SOPInstanceUID = ""
        q.SOPClassUID = ""
        q.InstanceNumber = ""
        if modality.upper() == "MR":  # what the sequence rules read; a mask object needs only its UID
            q.ImageType = ""
            q.ProtocolName = ""
            q.SequenceName = ""
            q.DiffusionBValue = None
        out = []
        for r in self._find("the instance query", q):
            b = getattr(r, "DiffusionBValue", None)
            out.append(InstanceInfo(_str(r, "SOPInstanceUID"), _str(r, "SOPClassUID"), _multi(r, "ImageType"),
                                    _str(r, "ProtocolName"),
                                    _str(r, "SequenceName"), float(b) if b not in (None, "") else None,
                                    _int(getattr(r, "InstanceNumber", 0))))
        return out

    # -- retrieval ---------------------------------------------------------------------------
    def _on_store(self, event):
        """A C-STORE sub-operation (of our C-GET, or to our C-MOVE SCP): hand the dataset over."""
        with self._lock:
            if self._sink is None or self._error is not None:
                return 0xA700
            try:
                ds = event.dataset
                ds.file_meta = event.file_meta
                self._sink(ds)
            except BaseException as exc:  # re-raised in the caller's thread after the C-GET / C-MOVE
                self._error = exc
                return 0xA700
        return 0x0000

    def _start_scp(self) -> None:
        from pynetdicom import AE, evt

        if self.scp is not None:
            return
        scp = AE(ae_title=self.cfg.move_ae)
        for uid in STORAGE_CLASSES:
            scp.add_supported_context(uid)
        try:
            self.scp = scp.start_server((self.cfg.move_bind, self.cfg.move_port), block=False,
                                        evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as exc:
            raise PacsError(f"{self.cfg.label()}: cannot listen on {self.cfg.move_bind}:{self.cfg.move_port} for "
                            f"C-MOVE ({exc.strerror or type(exc).__name__}): check move-port", fatal=True) from None

    def retrieve(self, study_uid: str, series_uid: str, sop_uids: list[str], whole_series: bool, sink) -> None:
        from pydicom.dataset import Dataset

        if self.cfg.retrieve == "c-move":
            self._start_scp()
        assoc = self._associate()
        queries = []
        for sop in ([None] if whole_series else sop_uids):
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES" if sop is None else "IMAGE"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series_uid
            if sop is not None:
                q.SOPInstanceUID = sop
            queries.append(q)
        self._sink, self._error = sink, None
        try:
            for q in queries:
                if self.cfg.retrieve == "c-get":
                    responses = assoc.send_c_get(q, GET)
                    what = "C-GET"
                else:
                    responses = assoc.send_c_move(q, self.cfg.move_ae, MOVE)
                    what = "C-MOVE"
                for status, _ in responses:
                    code = self._status(f"the {what}", status)
                    if code in PENDING:
                        continue
                    if self._error is not None:
                        raise self._error
                    if code == 0xA801:
                        raise PacsError(f"{self.cfg.label()}: {what} refused: the PACS does not know move-ae "
                                        f"'{self.cfg.move_ae}' (register it with port {self.cfg.move_port})", fatal=True)
                    if code not in (OK, 0xB000):
                        raise PacsError(f"{self.cfg.label()}: {what} failed (status 0x{code:04X})")
                if self._error is not None:
                    raise self._error
        finally:
            self._sink = None

    def close(self) -> None:
        if self.assoc is not None:
            try:
                if self.assoc.is_established:
                    self.assoc.release()
            finally:
                self.assoc = None
        if self.scp is not None:
            self.scp.shutdown()
            self.scp = None

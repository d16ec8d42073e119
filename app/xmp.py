"""XMP sidecars: an estimated location written beside a photo instead of into a copy of it.

Naming: ``photo.ext.xmp`` (``IMG_1234.HEIC.xmp``), the name digiKam writes by default and Immich reads
and writes (Immich also reads ``photo.xmp``, which would be ambiguous for ``IMG_1.jpg`` beside
``IMG_1.heic``); darktable reads it too. The position is ``exif:GPSLatitude``/``exif:GPSLongitude`` in
the XMP form (``DDD,MM.mmmmmmK``), which all of them read. No library can tell an estimated position
from a measured one by these fields alone, so the packet also says so: ``exif:GPSProcessingMethod`` (an
EXIF field libraries show) names this tool, the source and the confidence, and the properties of the
``landmark:`` namespace carry them as separate values for programs.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

SUFFIX = ".xmp"
NAMESPACE = "http://ns.landmark-tagging.local/1.0/"
TOOL = "landmark-tagging"


def sidecar_name(photo: str) -> str:
    """``dir/IMG_1.HEIC`` -> ``dir/IMG_1.HEIC.xmp``."""
    return photo + SUFFIX


def xmp_coordinate(value: float, positive: str, negative: str) -> str:
    """Signed decimal degrees -> XMP's ``DDD,MM.mmmmmmK`` (1e-6 minute ~ 2 mm)."""
    micro_minutes = round(abs(value) * 60 * 1_000_000)
    degrees, rest = divmod(micro_minutes, 60 * 1_000_000)
    return f"{degrees},{rest / 1_000_000:.6f}{positive if value >= 0 else negative}"


def method(source: str, confidence: float) -> str:
    """What GPSProcessingMethod says (in the sidecar and in a tagged copy's EXIF)."""
    return f"estimated by {TOOL} (source: {source}), confidence {confidence:.3f}"


def sidecar(lat: float, lon: float, name: str, source: str, confidence: float) -> str:
    """An XMP packet marking the position as this tool's estimate."""
    attrs = {
        "exif:GPSVersionID": "2.3.0.0",
        "exif:GPSLatitude": xmp_coordinate(lat, "N", "S"),
        "exif:GPSLongitude": xmp_coordinate(lon, "E", "W"),
        "exif:GPSMapDatum": "WGS-84",
        "exif:GPSProcessingMethod": method(source, confidence),
        "landmark:Estimated": "True",
        "landmark:Tool": TOOL,
        "landmark:Source": source,
        "landmark:Confidence": f"{confidence:.6f}",
        "landmark:Place": name,
    }
    body = "\n".join(f"    {k}={quoteattr(v)}" for k, v in attrs.items())
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
            ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
            '  <rdf:Description rdf:about=""\n'
            '    xmlns:exif="http://ns.adobe.com/exif/1.0/"\n'
            f'    xmlns:landmark="{NAMESPACE}"\n'
            f"{body}/>\n"
            " </rdf:RDF>\n"
            "</x:xmpmeta>\n"
            '<?xpacket end="w"?>\n')

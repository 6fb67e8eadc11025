"""
The HTTP status code of every protocol error: one table, in one place.

The HTTP API (L{pfo3.web.http}) answers an error with its protocol JSON
(C{{"estado": "error", "codigo": ...}}) and the status this table gives its
C{codigo}; a code missing from it (a third party's) is a 500.
"""

from __future__ import annotations

from typing import Dict

from pfo3.errors import Pfo3Error

#: C{codigo} → HTTP status.  C{docs/web.md} shows the same table; a test
#: checks that every code of L{pfo3.errors.ERROR_CODES} is here.
HTTP_STATUS: Dict[str, int] = {
    # The request itself is wrong: fix it before retrying.
    "utf8_invalido": 400,
    "json_invalido": 400,
    "no_es_objeto": 400,
    "tarea_id_invalido": 400,
    "tipo_faltante": 400,
    "tipo_desconocido": 400,
    "contenido_faltante": 400,
    "contenido_invalido": 400,
    "excede_timeout": 400,
    "op_desconocida": 400,
    "esperar_invalido": 400,
    "subida_invalida": 400,
    # Object storage that this server does not have or cannot presign for.
    "blobs_desactivado": 501,
    "urls_no_soportadas": 501,
    # Who is asking.
    "token_faltante": 401,
    "token_invalido": 401,
    "token_expirado": 401,
    "prohibido": 403,
    # The task's identifier.
    "tarea_desconocida": 404,
    "ref_desconocida": 404,
    "tarea_id_duplicado": 409,
    "tarea_id_en_uso": 409,
    # Too much.
    "linea_demasiado_larga": 413,
    "resultado_demasiado_grande": 413,
    "tasa_excedida": 429,
    "ocupado": 429,
    "buffer_lleno": 429,
    "demasiadas_conexiones": 429,
    # The task ran and failed in a way it explained: the request could not
    # be processed as sent.
    "tarea_fallida": 422,
    # The server, or what it depends on, cannot answer now: retry later.
    "apagando": 503,
    "broker_no_disponible": 503,
    "almacen_no_disponible": 503,
    "reintentos_agotados": 503,
    "almacen_objetos_no_disponible": 503,
    # The object storage refused the server (its keys, its bucket): the
    # server's configuration, upstream of it.
    "almacen_objetos_denegado": 502,
    "almacen_objetos_sin_cubo": 502,
    "timeout": 504,
    "error_interno": 500,
}


def http_status(error: Pfo3Error) -> int:
    """
    @return: The HTTP status that answers C{error}.
    """
    return HTTP_STATUS.get(error.codigo, 500)

/*
 * cardgate plugin ABI, version 1.3 (1.1 added `description` to the declaration; 1.2 the
 * CARDGATE_FLAG_EFFECT_FREE flag; 1.3 the optional `encounter` of a SettlementRequest).
 *
 * A cardgate plugin is a shared library exporting one function, CARDGATE_ENTRY_SYMBOL, that
 * returns a pointer to a static cardgate_declaration. The gateway checks the magic bytes, the
 * ABI major version (equal) and minor version (not newer than its own), then calls init once
 * per configured instance, call for every operation, and destroy when the instance retires.
 * The library itself is never unloaded.
 *
 * Messages are JSON byte buffers (the schemas are the Rust SDK's types, documented in
 * docs/PLUGINS.md). Input buffers are borrowed for the duration of a call. Output is handed to
 * the host's write callback, which copies it before returning: memory is never freed on the
 * other side of the boundary.
 *
 * The messages (JSON, UTF-8) are described field by field, with their meanings, by the JSON
 * Schemas in sdk/schema/: SettlementRequest (input of quote and settle) -> Split,
 * InquiryRequest -> Inquiry, ReversalRequest -> Reversal, Health, and PluginError (the answer
 * with status 1). They are generated from the SDK's types; docs/PLUGINS.md explains the
 * amounts.
 *
 * Duties of a plugin written in C:
 * - call may run on several threads at once for the same instance: it must be thread-safe;
 * - never let a C++ exception or a longjmp cross the boundary;
 * - set CARDGATE_FLAG_UNWIND in flags to run in-process: the host loads a library without it
 *   only in the process tier. For C it is a promise that every entry point returns a status
 *   and never aborts, exits, or lets a C++ exception or a longjmp out (for Rust the SDK sets
 *   it when the library is built with panic = "unwind");
 * - keep the declaration and every string it points to alive and unchanged forever.
 *
 * Compatibility: the first 16 bytes of the declaration (magic, abi_major, abi_minor, size)
 * keep their layout in every ABI version. Later minor versions only append fields and raise
 * `size`; the host reads no field past `size`.
 *
 * This header is kept in sync with the Rust SDK (sdk/src/abi.rs) by a test that compiles it
 * and compares every size, offset and constant.
 */
#ifndef CARDGATE_PLUGIN_H
#define CARDGATE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CARDGATE_MAGIC "CARDGATE" /* 8 bytes, no NUL in the declaration */
#define CARDGATE_ABI_MAJOR 1
#define CARDGATE_ABI_MINOR 3
#define CARDGATE_ENTRY_SYMBOL "cardgate_plugin_declaration"

/* cardgate_declaration.flags */
#define CARDGATE_FLAG_UNWIND 1u
/* 1.2: quote, settle and reverse change nothing anywhere (answers from inputs alone): the
 * gateway may repeat or forget a call, and records a settlement whose payers all set it in
 * one durable commit. Never set it in a plugin that talks to an outside system. */
#define CARDGATE_FLAG_EFFECT_FREE 2u

/* Operations: the `operation` argument of call. */
#define CARDGATE_OP_INQUIRE 1u /* InquiryRequest    -> Inquiry  */
#define CARDGATE_OP_QUOTE 2u   /* SettlementRequest -> Split    */
#define CARDGATE_OP_SETTLE 3u  /* SettlementRequest -> Split    */
#define CARDGATE_OP_REVERSE 4u /* ReversalRequest   -> Reversal */
#define CARDGATE_OP_HEALTH 5u  /* (no input)        -> Health   */

/* Status codes returned by init and call, and what the output holds. */
#define CARDGATE_STATUS_OK 0                /* the JSON answer */
#define CARDGATE_STATUS_ERROR 1             /* JSON {"code": "...", "message": "..."} */
#define CARDGATE_STATUS_BAD_INPUT 2         /* UTF-8 reason */
#define CARDGATE_STATUS_PANIC 3             /* UTF-8 panic message */
#define CARDGATE_STATUS_UNKNOWN_OPERATION 4 /* nothing */

/* Log levels for cardgate_log_fn. */
#define CARDGATE_LOG_ERROR 1u
#define CARDGATE_LOG_WARN 2u
#define CARDGATE_LOG_INFO 3u
#define CARDGATE_LOG_DEBUG 4u
#define CARDGATE_LOG_TRACE 5u

/* Host callback receiving output; copies `len` bytes before it returns. */
typedef void (*cardgate_write_fn)(void *sink, const uint8_t *data, size_t len);

/* Host callback receiving one log record; both buffers are UTF-8, borrowed for the call. */
typedef void (*cardgate_log_fn)(void *ctx, uint32_t level, const uint8_t *target, size_t target_len,
                                const uint8_t *message, size_t message_len);

/* What the host offers at init. The struct itself is valid only during init; `ctx` and `log`
 * stay valid for as long as the library is loaded. Append-only, like the declaration. */
typedef struct cardgate_host_api {
    uint32_t size;          /* sizeof(cardgate_host_api) as the host was built */
    uint16_t abi_major;     /* the host's ABI */
    uint16_t abi_minor;
    uint32_t max_log_level; /* most verbose CARDGATE_LOG_* level the host records; 0 = none */
    uint32_t reserved;      /* zero */
    void *ctx;              /* opaque, passed back to log */
    cardgate_log_fn log;    /* may be NULL */
} cardgate_host_api;

/* Builds an instance from its JSON configuration; on CARDGATE_STATUS_OK stores it in
 * *instance, otherwise writes a JSON error through write. */
typedef int32_t (*cardgate_init_fn)(const cardgate_host_api *host, const uint8_t *config, size_t config_len,
                                    void **instance, void *sink, cardgate_write_fn write);

/* Runs one operation; writes its output through write and returns a status. */
typedef int32_t (*cardgate_call_fn)(void *instance, uint32_t operation, const uint8_t *input, size_t input_len,
                                    void *sink, cardgate_write_fn write);

/* Drops an instance; no call is in flight. */
typedef void (*cardgate_destroy_fn)(void *instance);

typedef struct cardgate_declaration {
    uint8_t magic[8];        /* CARDGATE_MAGIC */
    uint16_t abi_major;      /* CARDGATE_ABI_MAJOR */
    uint16_t abi_minor;      /* CARDGATE_ABI_MINOR */
    uint32_t size;           /* sizeof(cardgate_declaration) */
    uint32_t flags;          /* CARDGATE_FLAG_* */
    uint32_t reserved;       /* zero */
    const char *sdk_version; /* NUL-terminated, static */
    const char *name;        /* NUL-terminated, static */
    const char *version;     /* NUL-terminated, static */
    cardgate_init_fn init;
    cardgate_call_fn call;
    cardgate_destroy_fn destroy;
    /* ABI 1.1 */
    const char *description; /* NUL-terminated, static; may be NULL */
} cardgate_declaration;

/* The entry point every plugin exports. */
const cardgate_declaration *cardgate_plugin_declaration(void);

#ifdef __cplusplus
}
#endif

#endif /* CARDGATE_PLUGIN_H */

/*
 * A cardgate plugin written in C against sdk/include/cardgate_plugin.h: the fund pays a
 * configured share of what is due, the rest is cash. It shows the whole ABI — declaration,
 * init with a JSON configuration, call with JSON in and out, destroy — with no Rust at all.
 *
 * Build: cc -std=c11 -O2 -shared -fPIC -I ../../sdk/include -o libhalf_pay.so half_pay.c
 *
 * The JSON handling is deliberately minimal (it looks for two integer fields); a real C plugin
 * would use a JSON library.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cardgate_plugin.h"

typedef struct {
    int64_t fund_bp; /* share paid by the fund, in basis points */
} half_pay;

/* Finds `"key":` in a JSON text of `len` bytes and parses the integer after it. */
static int find_int(const uint8_t *json, size_t len, const char *key, int64_t *out) {
    char pattern[64];
    int n = snprintf(pattern, sizeof pattern, "\"%s\":", key);
    if (n <= 0 || (size_t)n >= sizeof pattern) return 0;
    for (size_t i = 0; i + (size_t)n <= len; i++) {
        if (memcmp(json + i, pattern, (size_t)n) == 0) {
            size_t j = i + (size_t)n;
            while (j < len && json[j] == ' ') j++;
            char digits[32];
            size_t k = 0;
            while (j < len && k + 1 < sizeof digits && (json[j] == '-' || (json[j] >= '0' && json[j] <= '9')))
                digits[k++] = (char)json[j++];
            if (k == 0) return 0;
            digits[k] = '\0';
            *out = strtoll(digits, NULL, 10);
            return 1;
        }
    }
    return 0;
}

static void emit(void *sink, cardgate_write_fn write, const char *text) {
    write(sink, (const uint8_t *)text, strlen(text));
}

static int32_t init(const cardgate_host_api *host, const uint8_t *config, size_t config_len, void **instance,
                    void *sink, cardgate_write_fn write) {
    (void)host;
    int64_t fund_bp = 5000;
    if (config_len > 0 && !find_int(config, config_len, "fund_bp", &fund_bp)) fund_bp = 5000;
    if (fund_bp < 0 || fund_bp > 10000) {
        emit(sink, write, "{\"code\":\"invalid_config\",\"message\":\"fund_bp: 0 to 10000\"}");
        return CARDGATE_STATUS_ERROR;
    }
    half_pay *self = malloc(sizeof *self);
    if (!self) {
        emit(sink, write, "{\"code\":\"internal\",\"message\":\"out of memory\"}");
        return CARDGATE_STATUS_ERROR;
    }
    self->fund_bp = fund_bp;
    *instance = self;
    return CARDGATE_STATUS_OK;
}

static int32_t call(void *instance, uint32_t operation, const uint8_t *input, size_t input_len, void *sink,
                    cardgate_write_fn write) {
    const half_pay *self = instance;
    if (operation == CARDGATE_OP_HEALTH) {
        emit(sink, write, "{\"status\":\"ok\"}");
        return CARDGATE_STATUS_OK;
    }
    if (operation == CARDGATE_OP_REVERSE) {
        emit(sink, write, "{\"accepted\":true}");
        return CARDGATE_STATUS_OK;
    }
    if (operation != CARDGATE_OP_QUOTE && operation != CARDGATE_OP_SETTLE) {
        if (operation == CARDGATE_OP_INQUIRE) {
            emit(sink, write, "{\"code\":\"unsupported\",\"message\":\"operation `inquire` is not supported\"}");
            return CARDGATE_STATUS_ERROR;
        }
        return CARDGATE_STATUS_UNKNOWN_OPERATION;
    }
    int64_t due = 0;
    if (!find_int(input, input_len, "due_fen", &due) || due < 0) {
        emit(sink, write, "no due_fen in the request");
        return CARDGATE_STATUS_BAD_INPUT;
    }
    /* Half up, in integer arithmetic; cash takes the rest, so the split balances exactly. */
    int64_t fund = (due * self->fund_bp + 5000) / 10000;
    char answer[256];
    snprintf(answer, sizeof answer,
             "{\"funds\":[{\"fund\":\"c_fund\",\"amount_fen\":%" PRId64 "}],\"account_pay_fen\":0,"
             "\"cash_pay_fen\":%" PRId64 "}",
             fund, due - fund);
    emit(sink, write, answer);
    return CARDGATE_STATUS_OK;
}

static void destroy(void *instance) { free(instance); }

static const cardgate_declaration DECLARATION = {
    .magic = {'C', 'A', 'R', 'D', 'G', 'A', 'T', 'E'},
    .abi_major = CARDGATE_ABI_MAJOR,
    .abi_minor = CARDGATE_ABI_MINOR,
    .size = sizeof(cardgate_declaration),
    /* No unwinding in C, and nothing here can abort: failures are status codes. */
    .flags = CARDGATE_FLAG_UNWIND,
    .reserved = 0,
    .sdk_version = "0.1.0",
    .name = "half-pay-c",
    .version = "1.0.0",
    .init = init,
    .call = call,
    .destroy = destroy,
};

const cardgate_declaration *cardgate_plugin_declaration(void) { return &DECLARATION; }

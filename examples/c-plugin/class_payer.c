/*
 * A regional payer written in C, reading the whole request with Jansson (a C JSON library
 * packaged by every Linux distribution: `apt-get install libjansson-dev`, `dnf install
 * jansson-devel`). Its policy, every number from its configuration:
 *
 *   - it insures cards whose insured region starts with one of `regions` (others: it answers
 *     `not_insured`, and the gateway skips it);
 *   - of each class A line its fund pays `class_a_bp` (basis points); of each class B line,
 *     after the patient's first self-pay share (the catalogue's `self_pay_bp` for the item,
 *     else `class_b_self_pay_bp`), `class_b_bp`; class C nothing; the part of a line above
 *     the catalogue's price cap (`price_cap_fen` x quantity) is never the fund's;
 *   - what it pays is rounded half up once, for the whole bill, and is at most what earlier
 *     payers left (`due_fen`) and what is left of its `annual_ceiling_fen` this year
 *     (`year_to_date.fund_paid_fen`); the rest is cash.
 *
 * The messages are described by the JSON Schemas in sdk/schema/ (SettlementRequest, Split,
 * ReversalRequest, Reversal, Health, PluginError); every field read here is one of theirs
 * (tests/tests/c_plugin.rs checks that against the schemas).
 *
 * Build:
 *   cc -std=c11 -O2 -Wall -Wextra -shared -fPIC -I ../../sdk/include \
 *      -o libclass_payer.so class_payer.c -ljansson
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cardgate_plugin.h"

#define MAX_REGIONS 16

typedef struct {
    char fund[64];
    int64_t class_a_bp, class_b_bp, class_b_self_pay_bp, annual_ceiling_fen;
    size_t region_count;
    char regions[MAX_REGIONS][8];
} class_payer;

/* Writes `root` as compact JSON to the sink, and releases it. */
static int32_t answer(json_t *root, void *sink, cardgate_write_fn write, int32_t status) {
    char *text = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (!text) {
        const char *oom = "{\"code\":\"internal\",\"message\":\"out of memory\"}";
        write(sink, (const uint8_t *)oom, strlen(oom));
        return CARDGATE_STATUS_ERROR;
    }
    write(sink, (const uint8_t *)text, strlen(text));
    free(text);
    return status;
}

/* A refusal the gateway understands: PluginError, {"code": ..., "message": ...}. */
static int32_t refuse(const char *code, const char *message, void *sink, cardgate_write_fn write) {
    return answer(json_pack("{s:s, s:s}", "code", code, "message", message), sink, write, CARDGATE_STATUS_ERROR);
}

/* A malformed request: a UTF-8 reason, status BAD_INPUT. */
static int32_t bad_input(const char *reason, void *sink, cardgate_write_fn write) {
    write(sink, (const uint8_t *)reason, strlen(reason));
    return CARDGATE_STATUS_BAD_INPUT;
}

/* An integer member of `object` in [min, max], or `fallback` when absent; -1 when wrong. */
static int integer(const json_t *object, const char *key, int64_t fallback, int64_t min, int64_t max, int64_t *out) {
    const json_t *value = json_object_get(object, key);
    if (!value || json_is_null(value)) {
        *out = fallback;
        return 0;
    }
    if (!json_is_integer(value)) return -1;
    *out = (int64_t)json_integer_value(value);
    return (*out < min || *out > max) ? -1 : 0;
}

/* A Decimal4 (an integer, or a string such as "0.5") in ten-thousandths; -1 when malformed. */
static int64_t decimal4(const json_t *value) {
    if (json_is_integer(value)) {
        json_int_t whole = json_integer_value(value);
        return (whole < 0 || whole > INT64_MAX / 10000) ? -1 : (int64_t)whole * 10000;
    }
    const char *text = json_string_value(value);
    if (!text) return -1;
    int64_t whole = 0, fraction = 0;
    int digits = 0, places = -1;
    for (const char *c = text; *c; c++) {
        if (*c == '.' && places < 0) {
            places = 0;
        } else if (*c >= '0' && *c <= '9' && places < 4 && digits < 15) {
            if (places < 0) {
                whole = whole * 10 + (*c - '0');
                digits++;
            } else {
                fraction = fraction * 10 + (*c - '0');
                places++;
            }
        } else {
            return -1;
        }
    }
    if (digits == 0 || places == 0) return -1;
    for (; places > 0 && places < 4; places++) fraction *= 10;
    return whole * 10000 + fraction;
}

static int32_t init(const cardgate_host_api *host, const uint8_t *config, size_t config_len, void **instance,
                    void *sink, cardgate_write_fn write) {
    (void)host;
    /* An absent configuration section arrives as `{}`. */
    json_error_t error;
    json_t *root = json_loadb((const char *)config, config_len, 0, &error);
    if (!json_is_object(root)) {
        json_decref(root);
        return refuse("invalid_config", "the configuration is not a JSON object", sink, write);
    }
    class_payer *self = calloc(1, sizeof *self);
    if (!self) {
        json_decref(root);
        return refuse("internal", "out of memory", sink, write);
    }
    const char *problem = NULL;
    const char *fund = json_string_value(json_object_get(root, "fund"));
    snprintf(self->fund, sizeof self->fund, "%s", fund ? fund : "regional_supplementary");
    if (integer(root, "class_a_bp", 10000, 0, 10000, &self->class_a_bp)) problem = "class_a_bp: 0 to 10000";
    if (integer(root, "class_b_bp", 10000, 0, 10000, &self->class_b_bp)) problem = "class_b_bp: 0 to 10000";
    if (integer(root, "class_b_self_pay_bp", 0, 0, 10000, &self->class_b_self_pay_bp))
        problem = "class_b_self_pay_bp: 0 to 10000";
    if (integer(root, "annual_ceiling_fen", INT64_MAX, 0, INT64_MAX, &self->annual_ceiling_fen))
        problem = "annual_ceiling_fen: a non-negative integer (fen)";
    const json_t *regions = json_object_get(root, "regions");
    if (!json_is_array(regions) || json_array_size(regions) == 0 || json_array_size(regions) > MAX_REGIONS) {
        problem = "regions: a list of 1 to 16 insured-region prefixes (2, 4 or 6 digits)";
    } else {
        size_t i;
        json_t *region;
        json_array_foreach(regions, i, region) {
            const char *prefix = json_string_value(region);
            size_t n = prefix ? strlen(prefix) : 0;
            if (n != 2 && n != 4 && n != 6) {
                problem = "regions: a list of 1 to 16 insured-region prefixes (2, 4 or 6 digits)";
                break;
            }
            memcpy(self->regions[i], prefix, n + 1);
        }
        self->region_count = json_array_size(regions);
    }
    json_decref(root);
    if (problem) {
        free(self);
        return refuse("invalid_config", problem, sink, write);
    }
    *instance = self;
    return CARDGATE_STATUS_OK;
}

static int insures(const class_payer *self, const char *region) {
    for (size_t i = 0; i < self->region_count; i++)
        if (strncmp(region, self->regions[i], strlen(self->regions[i])) == 0) return 1;
    return 0;
}

/* Quote and settle: the same split (this payer keeps no books of its own). */
static int32_t split(const class_payer *self, const json_t *request, void *sink, cardgate_write_fn write) {
    int64_t due, total;
    if (integer(request, "due_fen", -1, 0, INT64_MAX, &due) || due < 0 ||
        integer(request, "total_fen", -1, 0, INT64_MAX, &total) || total < 0)
        return bad_input("due_fen and total_fen: non-negative integers, required", sink, write);
    const json_t *card = json_object_get(request, "card");
    const char *region = json_string_value(json_object_get(card, "insured_region"));
    if (!region) return bad_input("card.insured_region: required", sink, write);
    if (!insures(self, region)) return refuse("not_insured", "this payer does not insure the card's region", sink, write);

    /* The fund's share, in fen x 10^4 (basis points), rounded once at the end. */
    int64_t share = 0, class_c = 0, self_pay = 0, over_cap = 0;
    size_t i;
    json_t *line;
    json_array_foreach(json_object_get(request, "lines"), i, line) {
        const char *category = json_string_value(json_object_get(line, "category"));
        int64_t amount;
        if (!category || integer(line, "amount_fen", -1, 0, INT64_MAX / 10000, &amount) || amount < 0)
            return bad_input("lines[].category and lines[].amount_fen: required", sink, write);
        const json_t *entry = json_object_get(line, "catalogue"); /* null or absent: no catalogue */
        int64_t cap;
        if (integer(entry, "price_cap_fen", -1, 0, INT64_MAX / 10000, &cap))
            return bad_input("lines[].catalogue.price_cap_fen: a non-negative integer", sink, write);
        if (cap >= 0) {
            int64_t quantity = decimal4(json_object_get(line, "quantity"));
            if (quantity < 0) return bad_input("lines[].quantity: a Decimal4", sink, write);
            /* cap x quantity, rounded half up to the fen, as the gateway counts line amounts. */
            int64_t allowed = (cap * quantity + 5000) / 10000;
            if (amount > allowed) {
                over_cap += amount - allowed;
                amount = allowed;
            }
        }
        if (strcmp(category, "class_a") == 0) {
            share += amount * self->class_a_bp;
        } else if (strcmp(category, "class_b") == 0) {
            int64_t bp;
            if (integer(entry, "self_pay_bp", self->class_b_self_pay_bp, 0, 10000, &bp))
                return bad_input("lines[].catalogue.self_pay_bp: 0 to 10000", sink, write);
            int64_t first = (amount * bp + 5000) / 10000;
            self_pay += first;
            share += (amount - first) * self->class_b_bp;
        } else if (strcmp(category, "class_c") == 0) {
            class_c += amount;
        } else {
            return bad_input("lines[].category: class_a, class_b or class_c", sink, write);
        }
    }
    int64_t year = 0, paid = 0;
    const json_t *ytd = json_object_get(request, "year_to_date");
    if (integer(ytd, "year", 0, 0, 9999, &year) || integer(ytd, "fund_paid_fen", 0, 0, INT64_MAX, &paid))
        return bad_input("year_to_date: year and fund_paid_fen, integers", sink, write);
    int64_t left = self->annual_ceiling_fen > paid ? self->annual_ceiling_fen - paid : 0;
    int64_t fund = (share + 5000) / 10000;
    if (fund > due) fund = due;
    if (fund > left) fund = left;

    json_t *result = json_pack(
        "{s:[{s:s, s:I}], s:I, s:I, s:{s:I, s:I}, s:[{s:s, s:I, s:s}, {s:s, s:I, s:s}, {s:s, s:I, s:s}]}", "funds",
        "fund", self->fund, "amount_fen", (json_int_t)fund, "account_pay_fen", (json_int_t)0, "cash_pay_fen",
        (json_int_t)(due - fund), "year_to_date_delta", "year", (json_int_t)year, "fund_paid_fen", (json_int_t)fund,
        "breakdown", "item", "class_b_self_pay", "amount_fen", (json_int_t)self_pay, "note",
        "the patient's first share of class B items", "item", "class_c", "amount_fen", (json_int_t)class_c, "note",
        "not covered", "item", "over_price_cap", "amount_fen", (json_int_t)over_cap, "note",
        "above the catalogue's price cap");
    return answer(result, sink, write, CARDGATE_STATUS_OK);
}

static int32_t call(void *instance, uint32_t operation, const uint8_t *input, size_t input_len, void *sink,
                    cardgate_write_fn write) {
    const class_payer *self = instance;
    switch (operation) {
    case CARDGATE_OP_HEALTH:
        return answer(json_pack("{s:s}", "status", "ok"), sink, write, CARDGATE_STATUS_OK);
    case CARDGATE_OP_INQUIRE:
        return refuse("unsupported", "operation `inquire` is not supported", sink, write);
    case CARDGATE_OP_REVERSE:
        /* Nothing of ours to undo: the gateway restores the accumulators. */
        return answer(json_pack("{s:b}", "accepted", 1), sink, write, CARDGATE_STATUS_OK);
    case CARDGATE_OP_QUOTE:
    case CARDGATE_OP_SETTLE: {
        json_error_t error;
        json_t *request = json_loadb((const char *)input, input_len, 0, &error);
        if (!json_is_object(request)) {
            json_decref(request);
            return bad_input("the request is not a JSON object", sink, write);
        }
        int32_t status = split(self, request, sink, write);
        json_decref(request);
        return status;
    }
    default:
        return CARDGATE_STATUS_UNKNOWN_OPERATION;
    }
}

static void destroy(void *instance) { free(instance); }

static const cardgate_declaration DECLARATION = {
    .magic = {'C', 'A', 'R', 'D', 'G', 'A', 'T', 'E'},
    .abi_major = CARDGATE_ABI_MAJOR,
    .abi_minor = CARDGATE_ABI_MINOR,
    .size = sizeof(cardgate_declaration),
    /* C does not unwind and nothing here aborts; the answer depends on the request alone. */
    .flags = CARDGATE_FLAG_UNWIND | CARDGATE_FLAG_EFFECT_FREE,
    .reserved = 0,
    .sdk_version = "0.1.0",
    .name = "class-payer-c",
    .version = "1.0.0",
    .description = "A regional payer in C: class A/B/C shares, catalogue self-pay and price caps, a yearly ceiling",
    .init = init,
    .call = call,
    .destroy = destroy,
};

const cardgate_declaration *cardgate_plugin_declaration(void) { return &DECLARATION; }

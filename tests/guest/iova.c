/* First-fit IOVA allocator over sorted, non-adjacent free ranges (see iova.h). */
#include "iova.h"

void iova_init(struct iova_space *s, u64 first, u64 last, u64 gran)
{
    s->gran = gran;
    s->n = 0;
    s->in_use = 0;
    u64 mask = gran - 1;
    if (first & mask) {
        if (first > UINT64_MAX - mask)
            return;
        first = (first + mask) & ~mask;
    }
    if ((last + 1) & mask) { /* last = 2^64 - 1 wraps to 0: already aligned */
        if (last < mask)
            return;
        last = (last & ~mask) - 1;
    }
    if (first > last)
        return;
    s->r[0] = (struct iova_range){first, last};
    s->n = 1;
}

static void remove_at(struct iova_space *s, u32 i)
{
    for (u32 j = i; j + 1 < s->n; j++)
        s->r[j] = s->r[j + 1];
    s->n--;
}

static bool insert_at(struct iova_space *s, u32 i, u64 first, u64 last)
{
    if (s->n == IOVA_MAX_RANGES)
        return false;
    for (u32 j = s->n; j > i; j--) /* overlapping copy: move backwards */
        s->r[j] = s->r[j - 1];
    s->r[i] = (struct iova_range){first, last};
    s->n++;
    return true;
}

void iova_reserve(struct iova_space *s, u64 first, u64 last)
{
    first &= ~(s->gran - 1);
    last |= s->gran - 1;
    for (u32 i = 0; i < s->n;) {
        struct iova_range r = s->r[i];
        if (r.last < first || r.first > last) {
            i++;
            continue;
        }
        remove_at(s, i);
        /* The parts outside the reserved range survive, in address order. */
        if (r.first < first && insert_at(s, i, r.first, first - 1))
            i++;
        if (r.last > last && insert_at(s, i, last + 1, r.last))
            i++;
    }
}

u64 iova_alloc(struct iova_space *s, u64 size)
{
    u64 mask = s->gran - 1;
    if (size == 0 || size > UINT64_MAX - mask)
        return IOVA_NONE;
    size = (size + mask) & ~mask;
    for (u32 i = 0; i < s->n; i++) {
        struct iova_range *r = &s->r[i];
        if (r->last - r->first < size - 1)
            continue;
        u64 iova = r->first;
        if (r->last - r->first == size - 1)
            remove_at(s, i);
        else
            r->first += size;
        s->in_use += size;
        return iova;
    }
    return IOVA_NONE;
}

bool iova_free(struct iova_space *s, u64 iova, u64 size)
{
    u64 mask = s->gran - 1;
    if (size == 0 || (iova & mask) || size > UINT64_MAX - mask)
        return false;
    size = (size + mask) & ~mask;
    if (iova + size - 1 < iova)
        return false;
    u64 last = iova + size - 1;
    u32 pos = 0;
    while (pos < s->n && s->r[pos].first <= iova)
        pos++;
    struct iova_range *prev = pos ? &s->r[pos - 1] : NULL, *next = pos < s->n ? &s->r[pos] : NULL;
    if ((prev && prev->last >= iova) || (next && next->first <= last))
        return false; /* double free, or never allocated */
    bool join_prev = prev && prev->last + 1 == iova, join_next = next && last + 1 == next->first;
    if (join_prev && join_next) {
        prev->last = next->last;
        remove_at(s, pos);
    } else if (join_prev) {
        prev->last = last;
    } else if (join_next) {
        next->first = iova;
    } else if (!insert_at(s, pos, iova, last)) {
        return false;
    }
    s->in_use -= size;
    return true;
}

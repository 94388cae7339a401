/*
 * chat-bridge's Mosquitto 2.0 plugin: who may connect as whom, how much one account may hold, and
 * how fast one user's commands may go. mosquitto/mosquitto.conf loads it; it checks, in order:
 *
 * At CONNECT (before Mosquitto creates, resumes or takes over any session):
 *   - the password, against a Mosquitto password file (`$7$` PBKDF2-SHA512 or `$6$` lines, as
 *     mosquitto_passwd and `chat-bridge users` write them), re-read whenever the file changes or
 *     Mosquitto reloads (SIGHUP). A password once verified is remembered as a SHA-256 of salt and
 *     password, so reconnects do not pay PBKDF2 again;
 *   - failed logins: after `auth_failures` failures from one address, further attempts from it are
 *     refused without checking the password until the bucket refills (one per `auth_refill`
 *     seconds): guessing is slow and wrong passwords cannot buy PBKDF2 work. Failures count per
 *     address (IPv6: per /64), never per username, so nobody can lock another user out;
 *   - the client id rule: an account's client id is its username, or the username, `:` and 1-64
 *     characters of [A-Za-z0-9_.-]. No account can use another's client ids (`:` cannot occur in
 *     a username), so nobody can kick a connection or read or destroy a queue that is not theirs;
 *     the bridge's account (`chat-bridge`) owns `chat-bridge` and `chat-bridge:<worker>`;
 *   - `max_connections` open connections per account and `max_sessions` persistent sessions
 *     (clean session false) per account, counted until Mosquitto expires them
 *     (`session_expiry` seconds offline, set it to mosquitto.conf's persistent_client_expiration).
 *     Accounts named in `unlimited` (default `chat-bridge`) have no caps;
 *   - keepalive: MQTT 3.1.1 clients must ask for 1 to `max_keepalive` seconds (Mosquitto 2.0 itself
 *     enforces max_keepalive on MQTT 5 clients only).
 *
 * On every message routed to a subscriber:
 *   - an offline persistent session of a capped account is queued at most `offline_queue` messages;
 *     more are dropped (and logged) until it reconnects: Mosquitto's max_queued_bytes is one figure
 *     for every client, sized for the bridge's own backlog, far too much for thousands of users'
 *     phones. The client catches up from the bridge's history (get-messages) when it returns.
 *   Clients without a username are left to Mosquitto's allow_anonymous.
 *
 * On every publish (the ACL check, before Mosquitto's acl_file):
 *   - a retained publish to a command topic ({prefix}/users/{user}/commands/...) is refused: a
 *     command is for the bridge once, never to be kept in the broker.
 *
 * On every message (after the ACL):
 *   - each user's commands over a token bucket (`rate` per second, bursts of `burst`) are dropped.
 *     Every command of every user reaches the bridge through one subscription, in one ordered
 *     stream; without a cap at the broker one client publishing as fast as its network allows
 *     would make everybody else's commands wait behind its backlog. Counted per {user} of the
 *     topic (the ACL lets only that user publish there), so more connections buy nothing. The
 *     bridge's events are never limited; last wills are not publishes and always go through. Keep
 *     it above the bridge's own limit: a client the bridge would still answer must never be cut.
 *
 * Refusals are logged (at most one line per account or address a minute, with counts).
 *
 *   plugin /path/to/chat_flood_guard.so
 *   plugin_opt_password_file mosquitto/passwd   (without it, Mosquitto's password_file decides)
 *   plugin_opt_prefix chat/v1
 *   plugin_opt_rate 100
 *   plugin_opt_burst 300
 *   plugin_opt_max_connections 20
 *   plugin_opt_max_sessions 10
 *   plugin_opt_session_expiry 604800
 *   plugin_opt_unlimited chat-bridge            (comma-separated)
 *   plugin_opt_auth_failures 10
 *   plugin_opt_auth_refill 6
 *   plugin_opt_max_keepalive 300                (MQTT 3.1.1: refuse keepalive 0 or above it)
 *   plugin_opt_offline_queue 1000               (messages kept for one offline persistent session)
 *   plugin_opt_acl acl_file    topic rules beyond these are Mosquitto's acl_file (the default with
 *                              plugin_opt_password_file), or `none` (the default without it: for
 *                              anonymous development brokers that have no acl_file)
 *
 * Build: cc -shared -fPIC -O2 -o chat_flood_guard.so flood_guard.c -lcrypto (needs mosquitto-dev,
 * libmosquitto-dev and libssl-dev); scripts/build-flood-guard does it.
 */
#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define TABLE_SIZE 4096
#define SWEEP_ABOVE 100000          /* entries tracked before idle ones are forgotten */
#define REPORT_EVERY_NS 60000000000LL
#define MAX_DEVICE 64

static mosquitto_plugin_id_t *plugin_id;

/* ---------------------------------------------------------------- options */

static double rate = 200.0;
static double burst = 1000.0;
static char *prefix;
static size_t prefix_len;
static char *password_file;
static long max_connections = 20;
static long max_sessions = 10;
static long session_expiry = 604800;
static char *unlimited;             /* ",name,name," */
static double auth_failures = 10;
static double auth_refill = 6;
static long max_keepalive = 0;      /* 0: any */
static long offline_queue = 0;      /* 0: no cap of the plugin's */
static bool acl_defers = true;      /* false: allow what it does not refuse (no acl_file follows) */

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static unsigned hash(const char *s, size_t len)
{
	unsigned h = 2166136261u;
	size_t i;
	for(i = 0; i < len; i++){
		h = (h ^ (unsigned char)s[i]) * 16777619u;
	}
	return h % TABLE_SIZE;
}

static bool is_unlimited(const char *user)
{
	size_t len = strlen(user);
	const char *p = unlimited;
	while(p && (p = strstr(p, user))){
		if(p[-1] == ',' && p[len] == ',') return true;
		p++;
	}
	return false;
}

/* ---------------------------------------------------------------- accounts */

struct account {
	struct account *next;
	char *user;
	char *stored;                     /* $7$iterations$salt$hash or $6$salt$hash */
	bool cached;
	unsigned char remembered[SHA256_DIGEST_LENGTH];
};

static struct account *accounts[TABLE_SIZE];
static struct stat accounts_stat;
static bool accounts_loaded;
static time_t accounts_read_at;
static long accounts_count = -1;

static void free_table(struct account **table)
{
	int i;
	for(i = 0; i < TABLE_SIZE; i++){
		while(table[i]){
			struct account *gone = table[i];
			table[i] = gone->next;
			OPENSSL_cleanse(gone->remembered, sizeof(gone->remembered));
			free(gone->user);
			free(gone->stored);
			free(gone);
		}
	}
}

static void free_accounts(void)
{
	free_table(accounts);
}

static struct account *find_in(struct account **table, const char *user)
{
	struct account *a;
	for(a = table[hash(user, strlen(user))]; a; a = a->next){
		if(!strcmp(a->user, user)) return a;
	}
	return NULL;
}

static struct account *find_account(const char *user)
{
	return find_in(accounts, user);
}

/* (Re)reads the password file; on failure keeps what it had (and refuses everyone if it had nothing). */
static void load_accounts(bool force)
{
	struct stat st;
	FILE *f;
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	long count = 0;
	static struct account *previous[TABLE_SIZE];

	if(!password_file) return;
	if(stat(password_file, &st)){
		if(!accounts_loaded || force){
			mosquitto_log_printf(MOSQ_LOG_ERR, "chat guard: cannot read %s: %s", password_file, strerror(errno));
		}
		return;
	}
	/* Unchanged, unless it changed within the file system's timestamp granularity of the last read. */
	if(!force && accounts_loaded && st.st_mtim.tv_sec + 1 < accounts_read_at
			&& st.st_mtim.tv_sec == accounts_stat.st_mtim.tv_sec
			&& st.st_mtim.tv_nsec == accounts_stat.st_mtim.tv_nsec
			&& st.st_ino == accounts_stat.st_ino && st.st_size == accounts_stat.st_size){
		return;
	}
	f = fopen(password_file, "r");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_ERR, "chat guard: cannot read %s: %s", password_file, strerror(errno));
		return;
	}
	/* The old table stays until the new one is read: a password verified before is still
	 * remembered when its line has not changed. */
	memcpy(previous, accounts, sizeof(accounts));
	memset(accounts, 0, sizeof(accounts));
	while((n = getline(&line, &cap, f)) > 0){
		char *colon;
		struct account *a, *old;
		unsigned h;
		while(n > 0 && (line[n-1] == '\n' || line[n-1] == '\r')) line[--n] = '\0';
		if(n == 0 || line[0] == '#') continue;
		colon = strchr(line, ':');
		if(!colon || colon == line) continue;
		*colon = '\0';
		a = calloc(1, sizeof(*a));
		if(!a) break;
		a->user = strdup(line);
		a->stored = strdup(colon + 1);
		if(!a->user || !a->stored){
			free(a->user);
			free(a->stored);
			free(a);
			break;
		}
		old = find_in(previous, a->user);
		if(old && old->cached && !strcmp(old->stored, a->stored)){
			a->cached = true;
			memcpy(a->remembered, old->remembered, sizeof(a->remembered));
		}
		h = hash(a->user, strlen(a->user));
		a->next = accounts[h];
		accounts[h] = a;
		count++;
	}
	free_table(previous);
	free(line);
	fclose(f);
	accounts_stat = st;
	accounts_read_at = time(NULL);
	accounts_loaded = true;
	if(force || count != accounts_count){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "chat guard: %ld accounts from %s", count, password_file);
	}
	accounts_count = count;
}

static int b64_decode(const char *in, size_t len, unsigned char *out, size_t out_cap)
{
	int n;
	size_t pad = 0;
	if(len == 0 || len % 4 || len / 4 * 3 > out_cap) return -1;
	n = EVP_DecodeBlock(out, (const unsigned char *)in, (int)len);
	if(n < 0) return -1;
	while(pad < 2 && in[len - 1 - pad] == '=') pad++;
	return n - (int)pad;
}

/* True when `password` matches the stored hash. */
static bool verify(const char *stored, const char *password)
{
	unsigned char salt[128], want[128], got[EVP_MAX_MD_SIZE];
	int salt_len, want_len;
	const char *p, *q;
	bool ok = false;

	if(!strncmp(stored, "$7$", 3)){
		char *end;
		long iterations = strtol(stored + 3, &end, 10);
		if(*end != '$' || iterations < 1 || iterations > 100000000) return false;
		p = end + 1;
		q = strchr(p, '$');
		if(!q) return false;
		salt_len = b64_decode(p, (size_t)(q - p), salt, sizeof(salt));
		want_len = b64_decode(q + 1, strlen(q + 1), want, sizeof(want));
		if(salt_len <= 0 || want_len != 64) return false;
		if(PKCS5_PBKDF2_HMAC(password, (int)strlen(password), salt, salt_len, (int)iterations,
				EVP_sha512(), want_len, got) == 1){
			ok = CRYPTO_memcmp(got, want, (size_t)want_len) == 0;
		}
	}else if(!strncmp(stored, "$6$", 3)){
		EVP_MD_CTX *ctx;
		unsigned int got_len = 0;
		p = stored + 3;
		q = strchr(p, '$');
		if(!q) return false;
		salt_len = b64_decode(p, (size_t)(q - p), salt, sizeof(salt));
		want_len = b64_decode(q + 1, strlen(q + 1), want, sizeof(want));
		if(salt_len <= 0 || want_len != 64) return false;
		ctx = EVP_MD_CTX_new();
		if(!ctx) return false;
		if(EVP_DigestInit_ex(ctx, EVP_sha512(), NULL) == 1
				&& EVP_DigestUpdate(ctx, password, strlen(password)) == 1
				&& EVP_DigestUpdate(ctx, salt, (size_t)salt_len) == 1
				&& EVP_DigestFinal_ex(ctx, got, &got_len) == 1 && got_len == 64){
			ok = CRYPTO_memcmp(got, want, 64) == 0;
		}
		EVP_MD_CTX_free(ctx);
	}
	OPENSSL_cleanse(got, sizeof(got));
	return ok;
}

/* A fast fingerprint of (stored hash, password) to recognise a password already verified. */
static bool remember_key(const struct account *a, const char *password, unsigned char out[SHA256_DIGEST_LENGTH])
{
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	unsigned int len = 0;
	bool ok = true;
	if(!ctx) return false;
	if(EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1
			|| EVP_DigestUpdate(ctx, a->stored, strlen(a->stored)) != 1
			|| EVP_DigestUpdate(ctx, "\n", 1) != 1
			|| EVP_DigestUpdate(ctx, password, strlen(password)) != 1
			|| EVP_DigestFinal_ex(ctx, out, &len) != 1 || len != SHA256_DIGEST_LENGTH){
		ok = false;
	}
	EVP_MD_CTX_free(ctx);
	return ok;
}

static bool password_ok(struct account *a, const char *password)
{
	unsigned char key[SHA256_DIGEST_LENGTH];
	bool ok, keyed;
	keyed = remember_key(a, password, key);
	if(keyed && a->cached && CRYPTO_memcmp(key, a->remembered, sizeof(key)) == 0){
		OPENSSL_cleanse(key, sizeof(key));
		return true;
	}
	ok = verify(a->stored, password);
	if(ok && keyed){
		memcpy(a->remembered, key, sizeof(key));
		a->cached = true;
	}
	OPENSSL_cleanse(key, sizeof(key));
	return ok;
}

/* ---------------------------------------------------------------- failed logins per address */

struct failures {
	struct failures *next;
	char *address;
	double tokens;
	int64_t at_ns;
	int64_t reported_ns;
	uint64_t refused;
};

static struct failures *failure_table[TABLE_SIZE];
static size_t failures_tracked;

/* The address failures count against: IPv4 as is, IPv6 by its /64. */
static void address_key(const char *address, char *out, size_t cap)
{
	int colons = 0;
	size_t i;
	snprintf(out, cap, "%s", address ? address : "?");
	if(!strchr(out, ':') || !strncmp(out, "::ffff:", 7)) return;
	for(i = 0; out[i]; i++){
		if(out[i] == ':' && ++colons == 4){
			out[i] = '\0';
			return;
		}
	}
}

static void sweep_failures(int64_t now)
{
	int64_t full_after = (int64_t)(auth_failures * auth_refill * 1e9);
	int i;
	for(i = 0; i < TABLE_SIZE; i++){
		struct failures **p = &failure_table[i];
		while(*p){
			if(now - (*p)->at_ns >= full_after){
				struct failures *gone = *p;
				*p = gone->next;
				free(gone->address);
				free(gone);
				failures_tracked--;
			}else{
				p = &(*p)->next;
			}
		}
	}
}

static struct failures *find_failures(const char *address, bool create, int64_t now)
{
	char key[64];
	unsigned h;
	struct failures *f;
	address_key(address, key, sizeof(key));
	h = hash(key, strlen(key));
	for(f = failure_table[h]; f; f = f->next){
		if(!strcmp(f->address, key)) break;
	}
	if(f){
		f->tokens += (double)(now - f->at_ns) / 1e9 / auth_refill;
		if(f->tokens > auth_failures) f->tokens = auth_failures;
		f->at_ns = now;
		return f;
	}
	if(!create) return NULL;
	if(failures_tracked >= SWEEP_ABOVE) sweep_failures(now);
	f = calloc(1, sizeof(*f));
	if(!f) return NULL;
	f->address = strdup(key);
	if(!f->address){
		free(f);
		return NULL;
	}
	f->tokens = auth_failures;
	f->at_ns = now;
	f->reported_ns = now - REPORT_EVERY_NS;
	f->next = failure_table[h];
	failure_table[h] = f;
	failures_tracked++;
	return f;
}

/* ---------------------------------------------------------------- connections and sessions */

struct session {
	char *client_id;
	int connected;                    /* open connections of this client id */
	int64_t offline_since_ns;
	long queued;                      /* messages routed to it while offline */
	uint64_t dropped;
	int64_t reported_ns;
};

struct conn;

struct user {
	struct user *next;
	char *name;
	long connections;
	struct conn *conns;
	struct session *sessions;
	long session_count;
	int64_t reported_ns;
	uint64_t refused;
	const char *reported_why;         /* a new reason is reported at once */
};

struct conn {
	struct conn *next;                /* in the table */
	struct conn *next_of_user;
	struct mosquitto *client;
	struct user *user;
	char *client_id;
	bool persistent;
};

static struct user *user_table[TABLE_SIZE];
static struct conn *conn_table[TABLE_SIZE];

static unsigned ptr_hash(const void *p)
{
	uintptr_t v = (uintptr_t)p;
	v ^= v >> 17;
	v *= 0x9E3779B1u;
	return (unsigned)(v % TABLE_SIZE);
}

static struct user *find_user(const char *name, bool create)
{
	unsigned h = hash(name, strlen(name));
	struct user *u;
	for(u = user_table[h]; u; u = u->next){
		if(!strcmp(u->name, name)) return u;
	}
	if(!create) return NULL;
	u = calloc(1, sizeof(*u));
	if(!u) return NULL;
	u->name = strdup(name);
	if(!u->name){
		free(u);
		return NULL;
	}
	u->reported_ns = now_ns() - REPORT_EVERY_NS;
	u->next = user_table[h];
	user_table[h] = u;
	return u;
}

static void forget_user_if_idle(struct user *u)
{
	unsigned h;
	struct user **p;
	if(u->connections || u->session_count) return;
	h = hash(u->name, strlen(u->name));
	for(p = &user_table[h]; *p; p = &(*p)->next){
		if(*p == u){
			*p = u->next;
			free(u->sessions);
			free(u->name);
			free(u);
			return;
		}
	}
}

static void drop_session(struct user *u, long i)
{
	free(u->sessions[i].client_id);
	u->sessions[i] = u->sessions[--u->session_count];
}

/* Sessions Mosquitto has expired by now are no longer counted. */
static void expire_sessions(struct user *u, int64_t now)
{
	long i = 0;
	while(i < u->session_count){
		if(!u->sessions[i].connected && session_expiry > 0
				&& now - u->sessions[i].offline_since_ns >= (int64_t)session_expiry * 1000000000LL){
			drop_session(u, i);
		}else{
			i++;
		}
	}
}

static long find_session(struct user *u, const char *client_id)
{
	long i;
	for(i = 0; i < u->session_count; i++){
		if(!strcmp(u->sessions[i].client_id, client_id)) return i;
	}
	return -1;
}

static bool user_has_connection(struct user *u, const char *client_id)
{
	struct conn *c;
	for(c = u->conns; c; c = c->next_of_user){
		if(!strcmp(c->client_id, client_id)) return true;
	}
	return false;
}

/* ---------------------------------------------------------------- logging */

static bool report_due(int64_t *reported_ns, int64_t now)
{
	if(now - *reported_ns < REPORT_EVERY_NS) return false;
	*reported_ns = now;
	return true;
}

static int refuse_user(struct user *u, const char *client_id, const char *address, const char *why)
{
	int64_t now = now_ns();
	u->refused++;
	if(why != u->reported_why || report_due(&u->reported_ns, now)){
		u->reported_why = why;
		u->reported_ns = now;
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				"chat guard: refused %s (client %s from %s): %s; %llu refused so far",
				u->name, client_id, address ? address : "?", why, (unsigned long long)u->refused);
	}
	/* Accounts are few when the plugin checks passwords: keep their counts; otherwise forget. */
	if(!password_file) forget_user_if_idle(u);
	return MOSQ_ERR_AUTH;
}

/* ---------------------------------------------------------------- the client id rule */

static bool client_id_allowed(const char *user, const char *client_id)
{
	size_t len = strlen(user);
	size_t i, device;
	if(!client_id || strncmp(client_id, user, len)) return false;
	if(client_id[len] == '\0') return true;
	if(client_id[len] != ':') return false;
	device = strlen(client_id + len + 1);
	if(device < 1 || device > MAX_DEVICE) return false;
	for(i = len + 1; client_id[i]; i++){
		unsigned char c = (unsigned char)client_id[i];
		if(!isalnum(c) && c != '_' && c != '.' && c != '-') return false;
	}
	return true;
}

/* ---------------------------------------------------------------- callbacks */

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *client_id = mosquitto_client_id(ed->client);
	const char *address = mosquitto_client_address(ed->client);
	bool persistent = !mosquitto_client_clean_session(ed->client);
	bool checked_password = false;
	int64_t now = now_ns();
	struct user *u;
	struct conn *c;
	unsigned h;
	(void)event;
	(void)userdata;

	if(!ed->username) return MOSQ_ERR_PLUGIN_DEFER; /* Mosquitto's allow_anonymous decides */

	if(password_file){
		struct failures *f = find_failures(address, false, now);
		struct account *a;
		if(f && f->tokens < 1.0){
			f->refused++;
			if(report_due(&f->reported_ns, now)){
				mosquitto_log_printf(MOSQ_LOG_WARNING,
						"chat guard: refusing logins from %s without checking them after repeated failures "
						"(one more every %.0f s); %llu refused so far",
						f->address, auth_refill, (unsigned long long)f->refused);
			}
			return MOSQ_ERR_AUTH;
		}
		load_accounts(false);
		a = find_account(ed->username);
		if(!a || !ed->password || !password_ok(a, ed->password)){
			f = find_failures(address, true, now);
			if(f) f->tokens -= 1.0;
			return MOSQ_ERR_AUTH;
		}
		checked_password = true;
	}

	u = find_user(ed->username, true);
	if(!u) return MOSQ_ERR_NOMEM;
	if(!client_id_allowed(ed->username, client_id)){
		return refuse_user(u, client_id, address, "a client id must be the username or username:device");
	}
	if(max_keepalive > 0 && mosquitto_client_protocol_version(ed->client) != 5){
		/* MQTT 5 clients are told the server's keepalive; 3.1.1 has no way to, and Mosquitto 2.0
		 * would let keepalive 0 (never) stand: a frozen client would stay online forever. */
		int keepalive = mosquitto_client_keepalive(ed->client);
		if(keepalive == 0 || keepalive > max_keepalive){
			return refuse_user(u, client_id, address, "keepalive must be 1 to max_keepalive seconds");
		}
	}
	if(!is_unlimited(u->name)){
		long s;
		/* A connection that takes over its own client id replaces one: never refused for the cap. */
		if(u->connections >= max_connections && !user_has_connection(u, client_id)){
			return refuse_user(u, client_id, address, "too many connections for this account");
		}
		expire_sessions(u, now);
		s = find_session(u, client_id);
		if(persistent){
			if(s < 0){
				struct session *grown;
				if(u->session_count >= max_sessions){
					return refuse_user(u, client_id, address,
							"too many persistent sessions for this account (reuse a client id, "
							"connect with clean session, or wait until old ones expire)");
				}
				grown = realloc(u->sessions, sizeof(*grown) * (size_t)(u->session_count + 1));
				if(!grown) return MOSQ_ERR_NOMEM;
				u->sessions = grown;
				s = u->session_count++;
				u->sessions[s].client_id = strdup(client_id);
				u->sessions[s].connected = 0;
				u->sessions[s].dropped = 0;
				u->sessions[s].reported_ns = now - REPORT_EVERY_NS;
				if(!u->sessions[s].client_id){
					u->session_count--;
					return MOSQ_ERR_NOMEM;
				}
			}
			u->sessions[s].connected++;
			u->sessions[s].queued = 0;
		}else if(s >= 0 && !u->sessions[s].connected){
			drop_session(u, s); /* a clean session replaces (deletes) the stored one */
		}
	}

	c = calloc(1, sizeof(*c));
	if(!c) return MOSQ_ERR_NOMEM;
	c->client_id = strdup(client_id);
	if(!c->client_id){
		free(c);
		return MOSQ_ERR_NOMEM;
	}
	c->client = ed->client;
	c->user = u;
	c->persistent = persistent && !is_unlimited(u->name);
	h = ptr_hash(ed->client);
	c->next = conn_table[h];
	conn_table[h] = c;
	c->next_of_user = u->conns;
	u->conns = c;
	u->connections++;
	return checked_password ? MOSQ_ERR_SUCCESS : MOSQ_ERR_PLUGIN_DEFER;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	unsigned h = ptr_hash(ed->client);
	struct conn **p, *c;
	(void)event;
	(void)userdata;

	for(p = &conn_table[h]; *p && (*p)->client != ed->client; p = &(*p)->next);
	if(!(c = *p)) return MOSQ_ERR_SUCCESS;
	*p = c->next;
	{
		struct user *u = c->user;
		struct conn **q;
		for(q = &u->conns; *q && *q != c; q = &(*q)->next_of_user);
		if(*q) *q = c->next_of_user;
		u->connections--;
		if(c->persistent){
			long s = find_session(u, c->client_id);
			if(s >= 0 && --u->sessions[s].connected <= 0){
				u->sessions[s].connected = 0;
				u->sessions[s].offline_since_ns = now_ns();
			}
		}
		free(c->client_id);
		free(c);
		/* Accounts are few when the plugin checks passwords: keep their counts (log throttles). */
		if(!password_file) forget_user_if_idle(u);
	}
	return MOSQ_ERR_SUCCESS;
}

/* The {user} of {prefix}/users/{user}/commands/..., or NULL when the topic is not a command. */
static const char *command_user(const char *topic, size_t *len)
{
	const char *user;
	const char *slash;
	if(strncmp(topic, prefix, prefix_len) || strncmp(topic + prefix_len, "/users/", 7)) return NULL;
	user = topic + prefix_len + 7;
	slash = strchr(user, '/');
	if(!slash || slash == user || strncmp(slash + 1, "commands/", 9)) return NULL;
	*len = (size_t)(slash - user);
	return user;
}

/* A message about to be queued for an offline persistent session of a capped account: at most
 * `offline_queue` of them until it reconnects (it catches up from the bridge's history then). */
static bool offline_queue_allows(struct mosquitto *client)
{
	const char *username = mosquitto_client_username(client);
	const char *client_id = mosquitto_client_id(client);
	struct user *u;
	struct session *s;
	long i;
	if(!username || !client_id || is_unlimited(username)) return true;
	u = find_user(username, false);
	if(!u || (i = find_session(u, client_id)) < 0) return true;
	s = &u->sessions[i];
	if(s->connected) return true;
	if(++s->queued <= offline_queue) return true;
	s->dropped++;
	if(report_due(&s->reported_ns, now_ns())){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				"chat guard: offline session %s of %s holds %ld messages: dropping more until it reconnects; "
				"%llu dropped so far", client_id, username, offline_queue, (unsigned long long)s->dropped);
	}
	return false;
}

static int64_t retained_reported_ns = -REPORT_EVERY_NS;
static uint64_t retained_refused;

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	size_t len;
	(void)event;
	(void)userdata;
	if(ed->access == MOSQ_ACL_WRITE && ed->retain && ed->topic && command_user(ed->topic, &len)){
		int64_t now = now_ns();
		retained_refused++;
		if(report_due(&retained_reported_ns, now)){
			mosquitto_log_printf(MOSQ_LOG_WARNING,
					"chat guard: refused a retained command from %s (client %s) on %s; %llu refused so far",
					mosquitto_client_username(ed->client), mosquitto_client_id(ed->client), ed->topic,
					(unsigned long long)retained_refused);
		}
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_READ && ed->qos > 0 && offline_queue > 0 && !offline_queue_allows(ed->client)){
		return MOSQ_ERR_ACL_DENIED;
	}
	return acl_defers ? MOSQ_ERR_PLUGIN_DEFER : MOSQ_ERR_SUCCESS;
}

/* ---------------------------------------------------------------- the flood guard */

struct bucket {
	struct bucket *next;
	char *user;
	double tokens;
	int64_t at_ns;
	int64_t reported_ns;
	uint64_t dropped;
};

static struct bucket *table[TABLE_SIZE];
static size_t tracked;

static void free_bucket(struct bucket *b)
{
	free(b->user);
	free(b);
	tracked--;
}

/* Forgets buckets that have refilled completely: they hold no information. */
static void sweep(int64_t now)
{
	int64_t full_after = (int64_t)(burst / rate * 1e9);
	int i;
	for(i = 0; i < TABLE_SIZE; i++){
		struct bucket **p = &table[i];
		while(*p){
			if(now - (*p)->at_ns >= full_after){
				struct bucket *gone = *p;
				*p = gone->next;
				free_bucket(gone);
			}else{
				p = &(*p)->next;
			}
		}
	}
}

static struct bucket *find(const char *user, size_t len, int64_t now)
{
	unsigned h = hash(user, len);
	struct bucket *b;
	for(b = table[h]; b; b = b->next){
		if(!strncmp(b->user, user, len) && b->user[len] == '\0') return b;
	}
	if(tracked >= SWEEP_ABOVE) sweep(now);
	b = calloc(1, sizeof(*b));
	if(!b) return NULL;
	b->user = strndup(user, len);
	if(!b->user){
		free(b);
		return NULL;
	}
	b->tokens = burst;
	b->at_ns = now;
	b->reported_ns = now - REPORT_EVERY_NS;
	b->next = table[h];
	table[h] = b;
	tracked++;
	return b;
}

static int on_message(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_message *ed = event_data;
	const char *user;
	size_t len = 0;
	struct bucket *b;
	int64_t now;
	(void)event;
	(void)userdata;

	if(!ed->topic || !(user = command_user(ed->topic, &len))) return MOSQ_ERR_SUCCESS;
	now = now_ns();
	b = find(user, len, now);
	if(!b) return MOSQ_ERR_SUCCESS; /* out of memory: never drop for our own failure */
	b->tokens += (double)(now - b->at_ns) / 1e9 * rate;
	if(b->tokens > burst) b->tokens = burst;
	b->at_ns = now;
	if(b->tokens >= 1.0){
		b->tokens -= 1.0;
		return MOSQ_ERR_SUCCESS;
	}
	b->dropped++;
	if(report_due(&b->reported_ns, now)){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				"chat flood guard: dropping commands from %s (client %s) over %.0f/s (burst %.0f); %llu dropped so far",
				b->user, mosquitto_client_id(ed->client), rate, burst, (unsigned long long)b->dropped);
	}
	return MOSQ_ERR_ACL_DENIED; /* Mosquitto acknowledges the publish and drops it */
}

/* ---------------------------------------------------------------- plugin entry points */

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	load_accounts(true);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static int set_string(char **field, const char *value)
{
	free(*field);
	*field = strdup(value);
	return *field ? MOSQ_ERR_SUCCESS : MOSQ_ERR_NOMEM;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *opts, int opt_count)
{
	int i, rc;
	const char *unlimited_opt = "chat-bridge";
	const char *acl_opt = NULL;
	(void)user_data;
	plugin_id = identifier;
	for(i = 0; i < opt_count; i++){
		const char *k = opts[i].key, *v = opts[i].value;
		if(!strcmp(k, "rate")) rate = atof(v);
		else if(!strcmp(k, "burst")) burst = atof(v);
		else if(!strcmp(k, "prefix")){ if(set_string(&prefix, v)) return MOSQ_ERR_NOMEM; }
		else if(!strcmp(k, "password_file")){ if(set_string(&password_file, v)) return MOSQ_ERR_NOMEM; }
		else if(!strcmp(k, "max_connections")) max_connections = atol(v);
		else if(!strcmp(k, "max_sessions")) max_sessions = atol(v);
		else if(!strcmp(k, "session_expiry")) session_expiry = atol(v);
		else if(!strcmp(k, "unlimited")) unlimited_opt = v;
		else if(!strcmp(k, "auth_failures")) auth_failures = atof(v);
		else if(!strcmp(k, "auth_refill")) auth_refill = atof(v);
		else if(!strcmp(k, "acl")) acl_opt = v;
		else if(!strcmp(k, "max_keepalive")) max_keepalive = atol(v);
		else if(!strcmp(k, "offline_queue")) offline_queue = atol(v);
		else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "chat guard: unknown option plugin_opt_%s", k);
			return MOSQ_ERR_INVAL;
		}
	}
	if(!prefix && set_string(&prefix, "chat/v1")) return MOSQ_ERR_NOMEM;
	prefix_len = strlen(prefix);
	unlimited = malloc(strlen(unlimited_opt) + 3);
	if(!unlimited) return MOSQ_ERR_NOMEM;
	sprintf(unlimited, ",%s,", unlimited_opt);
	if(rate <= 0 || burst < 1 || max_connections < 1 || max_sessions < 0 || session_expiry < 0
			|| auth_failures < 1 || auth_refill <= 0){
		mosquitto_log_printf(MOSQ_LOG_ERR, "chat guard: rate must be > 0, burst >= 1, max_connections >= 1, "
				"max_sessions >= 0, session_expiry >= 0, auth_failures >= 1, auth_refill > 0");
		return MOSQ_ERR_INVAL;
	}
	/* Mosquitto denies what every ACL callback defers: defer only when its acl_file follows. */
	if(acl_opt && !strcmp(acl_opt, "acl_file")) acl_defers = true;
	else if(acl_opt && !strcmp(acl_opt, "none")) acl_defers = false;
	else if(acl_opt){
		mosquitto_log_printf(MOSQ_LOG_ERR, "chat guard: plugin_opt_acl is acl_file or none");
		return MOSQ_ERR_INVAL;
	}else acl_defers = password_file != NULL;
	if(password_file){
		load_accounts(true);
		if(!accounts_loaded) return MOSQ_ERR_INVAL;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			"chat guard: client ids bound to accounts; per account at most %ld connections and %ld persistent "
			"sessions (expiring %ld s offline, queueing %ld messages), except %s; keepalive at most %ld s; "
			"no retained commands; %.0f commands/s per user, "
			"bursts of %.0f, on %s/users/+/commands/#; passwords %s; other topic rules %s",
			max_connections, max_sessions, session_expiry, offline_queue, unlimited_opt, max_keepalive, rate, burst, prefix,
			password_file ? password_file : "checked by Mosquitto",
			acl_defers ? "from Mosquitto's acl_file" : "none (plugin_opt_acl none)");
	if((rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL))) return rc;
	if((rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, NULL))) return rc;
	if((rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL))) return rc;
	if((rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL))) return rc;
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_MESSAGE, on_message, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	int i;
	(void)user_data;
	(void)opts;
	(void)opt_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_MESSAGE, on_message, NULL);
	for(i = 0; i < TABLE_SIZE; i++){
		while(table[i]){
			struct bucket *gone = table[i];
			table[i] = gone->next;
			free_bucket(gone);
		}
		while(conn_table[i]){
			struct conn *gone = conn_table[i];
			conn_table[i] = gone->next;
			free(gone->client_id);
			free(gone);
		}
		while(user_table[i]){
			struct user *gone = user_table[i];
			user_table[i] = gone->next;
			while(gone->session_count) drop_session(gone, 0);
			free(gone->sessions);
			free(gone->name);
			free(gone);
		}
		while(failure_table[i]){
			struct failures *gone = failure_table[i];
			failure_table[i] = gone->next;
			free(gone->address);
			free(gone);
		}
	}
	free_accounts();
	free(prefix);
	free(password_file);
	free(unlimited);
	prefix = password_file = unlimited = NULL;
	return MOSQ_ERR_SUCCESS;
}

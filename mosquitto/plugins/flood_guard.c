/*
 * chat-bridge flood guard: a Mosquitto 2.0 plugin that caps how fast one user's commands may go.
 *
 * Every command of every user reaches the bridge through one subscription, in one ordered stream.
 * Without a cap at the broker, one client publishing as fast as its network allows fills that
 * stream and everybody else's commands wait behind its backlog (or are dropped once the bridge's
 * queue in the broker is full). The bridge refuses commands over its own per-user limit, but it
 * can only do so after the broker has delivered them. This plugin drops, in the broker, each
 * command over a per-user token bucket (`rate` per second, bursts of `burst`), so a flood never
 * joins the stream. Commands are publishes to `{prefix}/users/{user}/commands/...` and are counted
 * per {user}, as the bridge counts them (the ACL lets only that user publish there), so opening
 * more connections buys no more. The bridge's own events are never limited; last wills are not
 * publishes and always go through. Set it above the bridge's own limit: a client the bridge would
 * still answer must never be cut here.
 *
 *   plugin /path/to/chat_flood_guard.so
 *   plugin_opt_rate 200          commands per second per user, on average
 *   plugin_opt_burst 1000        commands at once
 *   plugin_opt_prefix chat/v1    the bridge's topic prefix
 *
 * Build: cc -shared -fPIC -O2 -o chat_flood_guard.so flood_guard.c (needs mosquitto-dev and
 * libmosquitto-dev); scripts/build-flood-guard does it.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define TABLE_SIZE 4096
#define SWEEP_ABOVE 100000          /* users tracked before idle buckets are forgotten */
#define REPORT_EVERY_NS 60000000000LL

struct bucket {
	struct bucket *next;
	char *user;
	double tokens;
	int64_t at_ns;
	int64_t reported_ns;
	uint64_t dropped;
};

static mosquitto_plugin_id_t *plugin_id;
static double rate = 200.0;
static double burst = 1000.0;
static char *prefix;
static size_t prefix_len;
static struct bucket *table[TABLE_SIZE];
static size_t tracked;

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
	if(now - b->reported_ns >= REPORT_EVERY_NS){
		b->reported_ns = now;
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				"chat flood guard: dropping commands from %s (client %s) over %.0f/s (burst %.0f); %llu dropped so far",
				b->user, mosquitto_client_id(ed->client), rate, burst, (unsigned long long)b->dropped);
	}
	return MOSQ_ERR_ACL_DENIED; /* Mosquitto acknowledges the publish and drops it */
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *opts, int opt_count)
{
	int i;
	(void)user_data;
	plugin_id = identifier;
	for(i = 0; i < opt_count; i++){
		if(!strcmp(opts[i].key, "rate")){
			rate = atof(opts[i].value);
		}else if(!strcmp(opts[i].key, "burst")){
			burst = atof(opts[i].value);
		}else if(!strcmp(opts[i].key, "prefix")){
			free(prefix);
			prefix = strdup(opts[i].value);
		}
	}
	if(!prefix) prefix = strdup("chat/v1");
	if(!prefix) return MOSQ_ERR_NOMEM;
	prefix_len = strlen(prefix);
	if(rate <= 0 || burst < 1){
		mosquitto_log_printf(MOSQ_LOG_ERR, "chat flood guard: rate must be > 0 and burst >= 1");
		return MOSQ_ERR_INVAL;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			"chat flood guard: %.0f commands/s per user, bursts of %.0f, on %s/users/+/commands/#",
			rate, burst, prefix);
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_MESSAGE, on_message, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	int i;
	(void)user_data;
	(void)opts;
	(void)opt_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_MESSAGE, on_message, NULL);
	for(i = 0; i < TABLE_SIZE; i++){
		while(table[i]){
			struct bucket *gone = table[i];
			table[i] = gone->next;
			free_bucket(gone);
		}
	}
	free(prefix);
	prefix = NULL;
	return MOSQ_ERR_SUCCESS;
}

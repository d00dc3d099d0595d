// Package acl decides which topics each identity may publish to and
// subscribe to on the gateway. It is deny by default: only the table of the
// design opens anything, and a topic is matched level by level against the
// caller's own identity, never by pattern matching on the whole string, so
// no id, wildcard or $share prefix can reach another device's topics.
//
//	role      publish                                     subscribe
//	device    devices/{id}/kex/req, devices/{id}/up/+     devices/{id}/kex/resp, devices/{id}/kex/hint, devices/{id}/down/+
//	service   fleet/commands/{id}/{channel}               fleet/telemetry/#
//	admin     as service                                  as service, plus $SYS/#
//
// A device may subscribe to exactly those filters (or one down/{channel});
// services may narrow fleet/telemetry/# and share it ($share/{group}/...).
package acl

import (
	"strings"

	"fleetkey.dev/certs/identity"
)

// Decision is the answer and, when it is no, why, for logs and metrics.
type Decision struct {
	Allowed bool
	Reason  string
}

func allow() Decision             { return Decision{Allowed: true} }
func deny(reason string) Decision { return Decision{Reason: reason} }

// MaxTopicLength bounds what Check looks at (MQTT allows 65535 bytes; no
// fleetkey topic comes near 256).
const MaxTopicLength = 512

// Check decides whether who may publish to topic (write) or subscribe to,
// or receive from, topic (read: a filter at SUBSCRIBE, a topic name when a
// message is delivered).
func Check(who identity.ID, topic string, write bool) Decision {
	if len(topic) == 0 || len(topic) > MaxTopicLength {
		return deny("topic is empty or too long")
	}
	if strings.IndexByte(topic, 0) >= 0 {
		return deny("topic contains NUL")
	}
	if write && strings.ContainsAny(topic, "+#") {
		return deny("wildcards are not allowed in a topic name")
	}
	switch who.Role {
	case identity.RoleDevice:
		return device(who.Name, topic, write)
	case identity.RoleService:
		return service(topic, write, false)
	case identity.RoleAdmin:
		return service(topic, write, true)
	}
	return deny("role " + string(who.Role) + " may not publish or subscribe")
}

// levels4 splits a topic into its first four levels without allocating
// (every publish is checked); n is the number of levels, 5 meaning more
// than four.
func levels4(topic string) (l [4]string, n int) {
	for n < 4 {
		i := strings.IndexByte(topic, '/')
		if i < 0 {
			l[n] = topic
			return l, n + 1
		}
		l[n], topic = topic[:i], topic[i+1:]
		n++
	}
	return l, 5
}

func device(id, topic string, write bool) Decision {
	if strings.HasPrefix(topic, "$") {
		return deny("devices may not use $share or $SYS")
	}
	l, n := levels4(topic)
	if n < 3 || l[0] != "devices" || l[1] != id {
		return deny("a device may only use devices/<its own id>/...")
	}
	switch {
	case write && n == 4 && l[2] == "kex" && l[3] == "req":
		return allow()
	case write && n == 4 && l[2] == "up" && validLevel(l[3]):
		return allow()
	case !write && n == 4 && l[2] == "kex" && (l[3] == "resp" || l[3] == "hint"):
		return allow()
	case !write && n == 4 && l[2] == "down" && (l[3] == "+" || validLevel(l[3])):
		return allow()
	}
	if write {
		return deny("a device publishes only devices/<id>/kex/req and devices/<id>/up/<channel>")
	}
	return deny("a device subscribes only to devices/<id>/kex/resp, kex/hint and down/+")
}

func service(topic string, write, admin bool) Decision {
	if write {
		l, n := levels4(topic)
		if n == 4 && l[0] == "fleet" && l[1] == "commands" && identity.ValidateID(l[2]) == nil && validLevel(l[3]) {
			return allow()
		}
		return deny("services publish only fleet/commands/<device id>/<channel>")
	}
	filter := topic
	if rest, ok := strings.CutPrefix(topic, "$share/"); ok {
		group, f, ok := strings.Cut(rest, "/")
		if !ok || !validLevel(group) {
			return deny("malformed shared subscription")
		}
		filter = f
	}
	if admin && (filter == "$SYS/#" || strings.HasPrefix(filter, "$SYS/")) && filter == topic {
		return allow()
	}
	l := strings.Split(filter, "/")
	if len(l) < 2 || l[0] != "fleet" || l[1] != "telemetry" {
		if len(l) == 1 && l[0] == "#" {
			return deny("'#' would read every device's topics")
		}
		return deny("services subscribe only under fleet/telemetry/")
	}
	for i, lv := range l[2:] {
		switch {
		case lv == "#" && i == len(l)-3:
		case lv == "+", validLevel(lv):
		default:
			return deny("malformed topic filter")
		}
	}
	return allow()
}

// validLevel is a concrete topic level: the id grammar (so channels and
// share groups cannot smuggle wildcards or separators either).
func validLevel(s string) bool { return identity.ValidateID(s) == nil }
